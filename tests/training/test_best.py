"""Best checkpoints and early stop (mgrpo_cli/training/best.py): the pure rules, then the callback in a run."""
import pytest

from mgrpo_cli.reporting.metrics import summarize, summary_keys
from mgrpo_cli.training.best import ranking, stale

HISTORY = {10: 0.50, 20: 0.60, 30: 0.60, 40: 0.55, 50: 0.58}


def test_ranking_keeps_the_k_best_and_an_earlier_step_wins_a_tie():
    assert ranking(HISTORY, "max", 2) == [(20, 0.60), (30, 0.60)]
    assert ranking(HISTORY, "max", 3) == [(20, 0.60), (30, 0.60), (50, 0.58)]
    assert ranking(HISTORY, "min", 2) == [(10, 0.50), (40, 0.55)]
    assert ranking(HISTORY, "max", 0) == [] and ranking({}, "max", 2) == []


def test_stale_counts_validations_since_a_strict_improvement():
    # max: 0.60 at step 20 is the best; 30 ties it (no improvement), 40 and 50 are worse: 3 since
    assert stale(HISTORY, "max") == 3
    assert stale(HISTORY, "min") == 4  # 0.50 at the first validation stays the least
    assert stale({10: 0.1, 20: 0.2}, "max") == 0 and stale({}, "max") == 0


@pytest.mark.parametrize("n,two_pass", [(1, True), (1, False), (4, True), (3, False), (8, True)])
def test_summary_keys_are_the_numbers_summarize_gives(n, two_pass):
    records = [{"correct": [i % 2 == 0] * n, "answers": ["1"] * n, "completions": ["x"] * n,
                **({"t2_completion": "y", "t2_correct": i % 3 == 0} if two_pass else {})} for i in range(4)]
    got = [k for k, v in summarize(records).items() if isinstance(v, (int, float))]
    assert sorted(got) == sorted(summary_keys(n, two_pass))


def test_early_stop_ends_the_run_finished_with_its_reason(small_cfg, tmp_path):
    """A random tiny model never answers right: val/acc_t2 stays 0, so with patience 1 the second
    validation (step 2, no strict improvement) stops the run of 6 steps; it ends FINISHED, the reason in
    status.json, result.json and MLflow, the best checkpoint (step 1) exported beside the last."""
    import json
    import sqlite3

    import torch

    from mgrpo_cli.cli.train import run_train
    from mgrpo_cli.training.lifecycle import read_status

    result = run_train(small_cfg("logger.enabled=true", "layer=grpo", "model.max_completion_length=4",
                                 "trainer.max_steps=6", "trainer.val_every=1", "trainer.monitor=val/acc_t2",
                                 "trainer.early_stop_patience=1", "trainer.save_top_k=1"))
    (folder,) = (tmp_path / "train" / "runs").iterdir()
    status = read_status(folder)
    assert status["status"] == "FINISHED" and status["reason"].startswith("early stop: val/acc_t2 did not improve")
    saved = json.loads((folder / "result.json").read_text())
    assert saved["stop_reason"] == status["reason"] and sorted(saved["validations"]) == ["0", "1", "2"]
    assert result["best/step"] == 1.0 and result["best/acc_t2"] == 0.0
    assert [p.name for p in (folder / "checkpoints").glob("best-*.ckpt")] == ["best-step=000001.ckpt"]
    last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert (folder / "export-best" / "config.json").is_file() and (folder / "export" / "config.json").is_file()
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        (tag,) = con.execute("select value from tags where key = 'stop_reason'").fetchone()
        (run_status,) = con.execute("select status from runs").fetchone()
    assert tag == status["reason"] and run_status == "FINISHED"
