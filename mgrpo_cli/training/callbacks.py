"""A training run's outputs, as Lightning callbacks: the module trains, these write.

- :class:`SamplesTable`: every ``every`` training steps, up to ``n`` completions per layer, as
  trained on, appended to the run's MLflow table ``samples.json`` (step, layer, question, gold,
  turns, completion, reward, advantage), from the module's ``trained`` (the last step's layers).
- :class:`HeldoutFiles`: after each validation, rank 0 writes its scores (``last_val``) to
  ``<run folder>/heldout/step_<step>.json`` and the per-problem rows the module gathered
  (``val_rows``) to ``heldout/step_<step>.jsonl`` (``reporting.heldout``) and, with an MLflow run,
  logs the rows file under ``heldout/``.

- :class:`TrackingOnDisk`: at every checkpoint, the MLflow run's outbox (what it logged and the store
  does not have yet, ``reporting.outbox``) is forced to disk, so what a run logged before its last
  checkpoint survives even a crash of the machine.

The build layer makes them (``cli.build.callbacks``); without them the module trains the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L

from mgrpo_cli.reporting import heldout


def sample_rows(trained: Any, step: int, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` completions per layer of a ``module.TrainedStep``, as rows of the samples table."""
    rows = []
    problems = trained.problems
    for spec, res in trained.layers:
        size = res.rollout.n
        rewards, advantages = res.rewards.reshape(-1), res.advantages.reshape(-1)
        for j, text in enumerate(res.rollout.texts[:n]):
            x = res.inputs[j // size]
            reward = rewards[j].item()
            rows.append({"step": step, "layer": spec.depth, "question": problems[x.problem].question,
                         "gold": problems[x.problem].answer, "turns": [list(t) for t in x.turns],
                         "completion": text, "reward": None if reward != reward else reward,
                         "advantage": advantages[j].item()})
    return rows


class SamplesTable(L.Callback):
    """Sampled completions to the MLflow table ``samples.json`` every ``every`` steps (see the module
    docstring); ``run_logger`` is a ``tracking.RunLogger``."""

    def __init__(self, run_logger: Any, every: int, n: int):
        self.run_logger, self.every, self.n = run_logger, every, n
        self.logged_through = -1  # the last step the table holds (a resumed run's earlier legs)

    def on_train_start(self, trainer, pl_module) -> None:
        # A run resumed after a SIGKILL does again the steps after its checkpoint; the killed leg already
        # appended their rows, and a resumed run repeats them exactly: keep the table's rows once.
        if trainer.global_step > 0:
            steps = [row.get("step", -1) for row in self.run_logger.read_table("samples.json")]
            self.logged_through = max(steps, default=-1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trained = pl_module.trained
        if trained is None or (pl_module.batches_done - 1) % self.every != 0:
            return
        if trainer.global_step <= self.logged_through:
            return
        rows = sample_rows(trained, trainer.global_step, self.n)
        if rows:
            self.run_logger.log_table(rows, "samples.json")


class HeldoutFiles(L.Callback):
    """Each validation's per-problem rows to ``<run_dir>/heldout/step_<step>.jsonl`` (rank 0), and
    to the MLflow run's artifacts when ``run_logger`` is given.

    A resumed run whose checkpoint's step had a validation due that left no file (a SIGKILL during it:
    the checkpoint is written before the validation) runs that validation first, as the uninterrupted
    run did; Lightning would restart past it."""

    def __init__(self, run_dir: str | Path, run_logger: Optional[Any] = None):
        self.run_dir, self.run_logger = Path(run_dir), run_logger

    def on_train_start(self, trainer, pl_module) -> None:
        from mgrpo_cli.training import distributed

        step, every = trainer.global_step, trainer.val_check_batch
        if step == 0 or not isinstance(every, int) or step % every:
            return
        missing = int(trainer.is_global_zero and not heldout.step_file(self.run_dir, step).is_file())
        if not distributed.max_over_ranks(missing):  # rank 0 sees the file; every rank validates or none
            return
        loop = trainer.fit_loop.epoch_loop
        # what Lightning does after a training step that has a validation due (TrainingEpochLoop.on_advance_end)
        trainer.validating = True
        loop.val_loop.run()
        trainer.training = True

    def on_validation_end(self, trainer, pl_module) -> None:
        rows = pl_module.val_rows
        if not rows or not trainer.is_global_zero:
            return
        heldout.write_scores(self.run_dir, trainer.global_step, pl_module.last_val)  # first: rows mark the end
        path = heldout.write_rows(heldout.step_file(self.run_dir, trainer.global_step),
                                  [heldout.ProblemResult(**r) for r in rows])
        if self.run_logger is not None:
            self.run_logger.log_file(path, heldout.FOLDER)


class TrackingOnDisk(L.Callback):
    """``run_logger.sync_to_disk()`` whenever a checkpoint is written (see the module docstring)."""

    def __init__(self, run_logger: Any):
        self.run_logger = run_logger

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.run_logger.sync_to_disk()
