"""The training run's outputs as callbacks (mgrpo_cli/training/callbacks.py), each alone, and the
module training the same with them as without."""
import json

import lightning as L
import torch

from mgrpo_cli.cli import build
from mgrpo_cli.reporting import heldout
from mgrpo_cli.training.callbacks import HeldoutFiles, SamplesTable
from tests.training.test_module import ParityReward, _module


class Recorder:
    """A stand-in for tracking.RunLogger: remembers the tables and files it is given."""

    def __init__(self, logged=()):
        self.tables, self.files, self.logged = [], [], list(logged)

    def read_table(self, artifact_file):
        return self.logged if artifact_file == "samples.json" else []

    def log_table(self, rows, artifact_file):
        self.tables.append((artifact_file, rows))

    def log_file(self, path, artifact_path=None):
        self.files.append((str(path), artifact_path))


def _trainer(steps, callbacks, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, **kw)


def _cfg(small_cfg, *extra):
    return small_cfg("model.max_completion_length=6", "grpo.prompts_per_step=2", "grpo.num_generations=4",
                     "layer.group_size=2", *extra)


def test_samples_table_appends_every_nth_steps_completions(small_cfg):
    cfg = _cfg(small_cfg)
    recorder = Recorder()
    reward = ParityReward()
    module, train_dl = _module(cfg, reward)
    _trainer(3, [SamplesTable(recorder, every=2, n=3)], limit_val_batches=0).fit(module, train_dataloaders=train_dl)
    reward.grader.close()
    assert [name for name, _ in recorder.tables] == ["samples.json", "samples.json"]  # steps 1 and 3 of 3
    rows = recorder.tables[0][1]
    assert [r["layer"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert set(rows[0]) == {"step", "layer", "question", "gold", "turns", "completion", "reward", "advantage"}
    assert rows[0]["turns"] == [] and len(rows[3]["turns"]) == 1
    assert rows[0]["reward"] in (0.0, 1.0) and isinstance(rows[0]["completion"], str)
    assert recorder.tables[1][1][0]["step"] > rows[0]["step"]


def test_a_resumed_run_does_not_append_the_killed_legs_steps_again(small_cfg, tmp_path):
    """Checkpoint at step 1, the killed leg logged steps 1 and 2: the resumed run redoes step 2 and adds step 3."""
    cfg = _cfg(small_cfg)
    reward = ParityReward()
    module, train_dl = _module(cfg, reward)
    trainer = _trainer(1, [])
    trainer.fit(module, train_dataloaders=train_dl)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    recorder = Recorder(logged=[{"step": 1}, {"step": 2}])
    module, train_dl = _module(cfg, reward)
    _trainer(3, [SamplesTable(recorder, every=1, n=2)], limit_val_batches=0).fit(
        module, train_dataloaders=train_dl, ckpt_path=tmp_path / "step1.ckpt")
    reward.grader.close()
    assert [{r["step"] for r in rows} for _, rows in recorder.tables] == [{3}]


def test_heldout_files_write_each_validations_rows_and_log_them(small_cfg, tmp_path):
    cfg = _cfg(small_cfg)
    recorder = Recorder()
    reward = ParityReward()
    module, _ = _module(cfg, reward)
    problems = build.held_out(cfg).problems
    _trainer(1, [HeldoutFiles(tmp_path / "run", recorder)]).validate(module, build.val_loader(problems, 4))
    reward.grader.close()
    path = heldout.step_file(tmp_path / "run", 0)
    rows = heldout.read_rows(path)
    assert [r.id for r in rows] == [p.id for p in problems]
    assert module.last_val["acc_t1"] == sum(r.t1 for r in rows) / len(rows)
    assert recorder.files == [(str(path), heldout.FOLDER)]
    assert all(json.loads(line)["id"] for line in path.read_text().splitlines())


def test_the_module_trains_the_same_with_or_without_its_callbacks(small_cfg, tmp_path):
    cfg = _cfg(small_cfg, "trainer.val_every=2")
    weights = []
    for callbacks in ([], [SamplesTable(Recorder(), every=1, n=4), HeldoutFiles(tmp_path, Recorder())]):
        reward = ParityReward()
        module, train_dl = _module(cfg, reward)
        val = build.val_loader(build.held_out(cfg).problems, 4)
        _trainer(2, callbacks, val_check_interval=2, check_val_every_n_epoch=None,
                 num_sanity_val_steps=0).fit(module, train_dataloaders=train_dl, val_dataloaders=val)
        reward.grader.close()
        weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})
    assert heldout.step_file(tmp_path, 2).is_file()  # the callbacks did run
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
