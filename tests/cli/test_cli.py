"""The real CLI in subprocesses: usage, bad overrides, --cfg job, a 2-step train, a sweep, eval."""
import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import requires_data, run_cli

FAST = ["debug=fast", "warmup.steps=2", "trainer.threads=2"]


def test_usage_is_fast_and_imports_no_torch():
    start = time.perf_counter()
    res = run_cli()
    assert res.returncode == 0 and "usage: mgrpo <command>" in res.stdout
    assert time.perf_counter() - start < 5
    import subprocess
    import sys
    probe = subprocess.run([sys.executable, "-c", "import sys; from mgrpo_cli.__main__ import main; main(['mgrpo']);"
                            "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip().endswith("False")


def test_unknown_command():
    res = run_cli("fit")
    assert res.returncode == 2 and "unknown command 'fit'" in res.stderr


@pytest.mark.parametrize("override,needle", [
    ("model=nope", "model=nope: no such model config"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("layer.select=smaple", "smaple"),
])
def test_bad_override_is_one_clear_message(override, needle, tmp_path):
    res = run_cli("train", override, f"paths.outputs={tmp_path}")
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert needle in out and "Traceback" not in out


def test_cfg_job_prints_composed_config():
    res = run_cli("train", "--cfg", "job", "layer=grpo")
    assert res.returncode == 0
    assert "num_generations: 8" in res.stdout and "depth: 1" in res.stdout and "name: tiny" in res.stdout


def _mlflow_runs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, status from runs").fetchall()


def test_two_step_train_then_eval_on_gsm8k_and_math500(tmp_path):
    res = run_cli("train", *FAST, f"paths.outputs={tmp_path}", "hydra.run.dir=" + str(tmp_path / "run"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "export" / "config.json").is_file()
    assert "held-out" in res.stdout
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        keys = {k for (k,) in con.execute("select distinct key from metrics")}
        params = {k for (k,) in con.execute("select key from params")}
    assert {"train/layer1/reward_mean", "train/layer2/accuracy", "train/layer2/wrong_to_right",
            "train/layer1/zero_variance_groups", "train/layer1/clip_region", "val/acc_t1",
            "val/delta_i2c", "val/fix_rate", "train/step_time"} <= keys  # val/break_rate: only with a t1-right problem
    assert {"grpo.num_generations", "layer.select", "model.name"} <= params
    # per-problem rows (.jsonl) and scores (.json) of the held-out evaluations before and after the two
    # steps; the rows also in MLflow
    steps = sorted(p.name for p in (run / "heldout").iterdir())
    assert steps == ["step_000000.json", "step_000000.jsonl", "step_000002.json", "step_000002.jsonl"]
    scores = json.loads((run / "heldout" / "step_000002.json").read_text())
    assert {"acc_t1", "acc_t2", "fix_rate"} <= set(scores)
    rows = [json.loads(line) for line in (run / "heldout" / "step_000002.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"id", "t1", "t2", "t1_answer", "t2_answer"}
    assert len({r["id"] for r in rows}) == 8
    assert len(list((tmp_path / "mlartifacts").rglob("heldout/step_000002.jsonl"))) == 1

    # continue from the checkpoint: two more steps
    res2 = run_cli("train", *FAST, f"paths.outputs={tmp_path}", "trainer.max_steps=4",
                   f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "hydra.run.dir=" + str(tmp_path / "run2"))
    assert res2.returncode == 0, res2.stderr[-3000:]

    for dataset, rows in (("gsm8k", ("gsm8k", "test.jsonl")), ("math500", ("math500", "test.jsonl"))):
        requires_data(*rows)
        out = tmp_path / f"eval-{dataset}"
        res = run_cli("eval", f"dataset={dataset}", "eval.limit=3", "eval.batch_size=3", "trainer.threads=2",
                      f"model.path={run / 'export'}", f"paths.outputs={tmp_path}", f"hydra.run.dir={out}")
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n"] == 3 and 0.0 <= summary["acc_t1"] <= 1.0 and "acc_t2" in summary
        lines = (out / "problems.jsonl").read_text().splitlines()
        assert len(lines) == 3 and {"gold", "completions", "correct", "t2_completion"} <= set(json.loads(lines[0]))
        assert (out / "transitions.png").stat().st_size > 0


def test_sweep_leaves_a_parent_mlflow_run_and_two_children(tmp_path):
    res = run_cli("train", "-m", *FAST, "trainer.max_steps=1", "seed=0,1", f"paths.outputs={tmp_path}",
                  "hydra.sweep.dir=" + str(tmp_path / "sweep"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 3 and all(status == "FINISHED" for _, status in runs)
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        (parent,) = con.execute("select run_uuid from tags where key = 'mgrpo.kind' and value = 'sweep'").fetchone()
        children = con.execute("select run_uuid from tags where key = 'mlflow.parentRunId' and value = ?",
                               (parent,)).fetchall()
    assert len(children) == 2
    assert (tmp_path / "sweep" / "0").is_dir() and (tmp_path / "sweep" / "1").is_dir()
