"""The best checkpoints of a run and early stopping, on one monitored validation metric.

``trainer.monitor`` names a ``val/*`` metric (``val/acc_t2``), ``trainer.monitor_mode`` whether more
(``max``) or less (``min``) is better. After every validation during fit, :class:`BestCheckpoints`
keeps the ``trainer.save_top_k`` best validations as ``checkpoints/best-step=<step>.ckpt``, written by
the run's one atomic checkpoint writer (``checkpointing.CheckpointWriter``), and with
``trainer.early_stop_patience`` = p stops the run after p validations in a row without a strict
improvement of the best value (Lightning's ``EarlyStopping`` rule with ``min_delta=0``); the reason is
the callback's ``stop_reason``, which ``mgrpo train`` records with the run's FINISHED status.

What the callback decides is a pure function of the run's validation history (:func:`ranking`,
:func:`stale`), read back from the held-out scores files (``reporting.heldout.read_scores``) when a
resumed run starts: a validation that happened after the checkpoint was written is in its files, one
that a kill cut short is run again (``callbacks.HeldoutFiles``), so a resumed run keeps the same best
checkpoints and stops at the same step as the uninterrupted run. This callback runs before
``HeldoutFiles`` (the build layer lists it first): its checkpoint is written before the scores file,
so a validation whose scores are on disk has its best checkpoint too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from mgrpo_cli.reporting import heldout

PREFIX = "val/"


@dataclass(frozen=True)
class Monitor:
    """What the run monitors: a validation metric (``metric``, without ``val/``) and what to do with it."""

    metric: str
    mode: str  # max | min
    top_k: int  # best checkpoints kept; 0 = none
    patience: Optional[int]  # validations without improvement before stopping; None = never


def better(a: float, b: float, mode: str) -> bool:
    """Whether ``a`` is strictly better than ``b``."""
    return a > b if mode == "max" else a < b


def ranking(history: Mapping[int, float], mode: str, k: int) -> list[tuple[int, float]]:
    """The ``k`` best (step, value) pairs of ``history`` (step -> value), best first; of equal values
    the earlier step ranks first (a later checkpoint must be better to replace it)."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(history.items(), key=lambda sv: (sign * sv[1], sv[0]))[:k]


def stale(history: Mapping[int, float], mode: str) -> int:
    """Validations since the last strict improvement of the best value (0 when the last one improved it)."""
    best, since = math.nan, 0
    for _, value in sorted(history.items()):
        if math.isnan(best) or better(value, best, mode):
            best, since = value, 0
        else:
            since += 1
    return since


def file_name(step: int) -> str:
    return f"best-step={step:06d}.ckpt"


class BestCheckpoints(L.Callback):
    """Best-k checkpoints and early stop on ``monitor`` (see the module docstring). ``writer`` is the
    run's ``checkpointing.CheckpointWriter``; ``run_dir`` holds the held-out scores files."""

    def __init__(self, monitor: Monitor, writer, run_dir: str | Path):
        self.monitor, self.writer, self.run_dir = monitor, writer, Path(run_dir)
        self.history: dict[int, float] = {}  # global step -> the monitored value of its validation
        self.stop_reason: Optional[str] = None

    @property
    def best(self) -> Optional[tuple[int, float, Path]]:
        """(step, value, checkpoint) of the best validation so far with a checkpoint, or None."""
        top = ranking(self.history, self.monitor.mode, max(self.monitor.top_k, 1))
        if not top or self.monitor.top_k == 0:
            return None
        step, value = top[0]
        return step, value, self.writer.folder / file_name(step)

    def on_train_start(self, trainer, pl_module) -> None:
        """The history up to the step fit starts at, from rank 0's scores files (a resumed run's
        earlier legs); best checkpoints beyond it or out of the ranking are removed."""
        step = trainer.global_step
        scores = heldout.read_scores(self.run_dir, up_to=step) if trainer.is_global_zero and step > 0 else {}
        scores = trainer.strategy.broadcast(scores, src=0)
        # the validation before training (step 0) has no checkpoint of its own to keep: it is not ranked
        self.history = {s: v[self.monitor.metric] for s, v in scores.items() if s > 0 and self.monitor.metric in v}
        if trainer.is_global_zero:
            kept = {file_name(s) for s, _ in ranking(self.history, self.monitor.mode, self.monitor.top_k)}
            for path in self.writer.folder.glob("best-step=*.ckpt"):
                if path.name not in kept:
                    self.writer.remove(path.name)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:  # only fit's have a state to keep
            return
        value = pl_module.last_val.get(self.monitor.metric)
        if value is None:  # a rate with no denominator this time (fix_rate with every t1 right)
            return
        step = trainer.global_step
        before = {file_name(s) for s, _ in ranking(self.history, self.monitor.mode, self.monitor.top_k)}
        self.history[step] = value
        top = ranking(self.history, self.monitor.mode, self.monitor.top_k)
        kept = {file_name(s) for s, _ in top}
        if file_name(step) in kept:
            self.writer.save(trainer, file_name(step))
        if trainer.is_global_zero:
            for name in before - kept:
                self.writer.remove(name)
        patience = self.monitor.patience
        if patience is not None and stale(self.history, self.monitor.mode) >= patience:
            best_step, best_value = ranking(self.history, self.monitor.mode, 1)[0]
            self.stop_reason = (f"early stop: {PREFIX}{self.monitor.metric} did not improve on {best_value:.4g} "
                                f"(step {best_step}) in {patience} validations (trainer.early_stop_patience)")
            trainer.should_stop = True
