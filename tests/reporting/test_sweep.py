"""The sweep callback on a small Hydra app (no model): parent MLflow run, the id in every job
(basic and joblib launchers), the one-line failed-job list and the exit code."""
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mgrpo_cli.reporting.sweep import failure_line, one_line, read_jobs

ROOT = Path(__file__).resolve().parents[2]

APP = """
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(config_path=".", config_name="app", version_base="1.3")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "parent.txt").write_text(os.environ.get("MGRPO_PARENT_RUN_ID", ""))
    if cfg.x == cfg.fail_at:
        raise ValueError(f"x={cfg.x}: boom\\nsecond line")


main()
"""


def _app(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(textwrap.dedent(f"""
        x: 0
        fail_at: -1
        task_name: toy
        logger: {{enabled: true, tracking_uri: "sqlite:///{tmp_path}/mlflow.db", experiment: toy}}
        paths: {{outputs: "{tmp_path}"}}
        hydra:
          sweep: {{dir: "{tmp_path}/sweep", subdir: "${{hydra.job.num}}"}}
          callbacks:
            sweep:
              _target_: mgrpo_cli.reporting.sweep.SweepCallback
        """))
    return tmp_path / "app.py"


def _run(app: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MGRPO_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, str(app), "-m", *args], cwd=app.parent, capture_output=True,
                          text=True, timeout=180, env=env)


def _runs(db: Path) -> dict[str, tuple[str, dict]]:
    with sqlite3.connect(db) as con:
        runs = dict(con.execute("select run_uuid, status from runs").fetchall())
        tags: dict[str, dict] = {r: {} for r in runs}
        for run, key, value in con.execute("select run_uuid, key, value from tags"):
            tags[run][key] = value
    return {r: (runs[r], tags[r]) for r in runs}


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_parent_run_reaches_every_job(tmp_path, launcher):
    res = _run(_app(tmp_path), "x=1,2,3", *launcher)
    assert res.returncode == 0, res.stderr[-2000:]
    (parent, (status, tags)), = _runs(tmp_path / "mlflow.db").items()
    assert status == "FINISHED" and tags["mgrpo.kind"] == "sweep" and tags["overrides"] == "x=1,2,3"
    assert [(tmp_path / "sweep" / str(j) / "parent.txt").read_text() for j in range(3)] == [parent] * 3
    jobs = read_jobs(tmp_path / "sweep")
    assert [(j["job"], j["overrides"], j["status"]) for j in jobs] == [
        ("0", ["x=1"], "FINISHED"), ("1", ["x=2"], "FINISHED"), ("2", ["x=3"], "FINISHED")]
    assert "#2 x=3: FINISHED" in tags["jobs"]
    artifact = next(p for p in (tmp_path / "mlartifacts").rglob("jobs.json") if parent in str(p))
    assert len(json.loads(artifact.read_text())) == 3


def test_failed_job_gives_one_line_and_a_non_zero_exit(tmp_path):
    res = _run(_app(tmp_path), "x=1,2,3", "fail_at=2")
    assert res.returncode != 0
    expected = "error: 1 of 3 sweep jobs failed: #1 (x=2 fail_at=2): FAILED: ValueError: x=2: boom"
    assert res.stderr.strip().splitlines()[-1] == expected, res.stderr[-2000:]
    status = json.loads((tmp_path / "sweep" / "1" / "status.json").read_text())
    assert status == {"status": "FAILED", "error": "ValueError: x=2: boom", "mlflow_run_id": None}
    (parent, (run_status, tags)), = _runs(tmp_path / "mlflow.db").items()
    assert run_status == "FAILED" and tags["failed_jobs"] == expected


def test_failure_line_reads_status_files(tmp_path):
    for job, status in enumerate([{"status": "FINISHED", "error": None, "mlflow_run_id": "a"},
                                  {"status": "KILLED", "error": "SIGTERM", "mlflow_run_id": "b"}, None]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        if status:
            (tmp_path / str(job) / "status.json").write_text(json.dumps(status))
    line = failure_line(read_jobs(tmp_path))
    assert line == ("error: 2 of 3 sweep jobs failed: #1 (seed=1): KILLED: SIGTERM; "
                    "#2 (seed=2): UNKNOWN: no status.json (the job was killed or never ended)")
    assert failure_line(read_jobs(tmp_path)[:1]) is None
    assert one_line(RuntimeError("a\nb")) == "RuntimeError: a" and len(one_line("x" * 500)) == 300


def _children(db: Path) -> tuple[str, list[tuple[str, dict]]]:
    runs = _runs(db)
    (parent,) = [r for r, (_, tags) in runs.items() if tags.get("mgrpo.kind") == "sweep"]
    return parent, [(status, tags) for r, (status, tags) in runs.items() if tags.get("mlflow.parentRunId") == parent]


@pytest.mark.slow
def test_joblib_debug_sweep_is_one_parent_with_four_children_and_a_report(tmp_path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    res = run_cli("train", "-m", "layer=grpo,mgrpo", "seed=0,1", "debug=fast", "trainer.threads=1",
                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"paths.outputs={tmp_path}",
                  f"hydra.sweep.dir={sweep}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    parent, children = _children(tmp_path / "mlflow.db")
    assert len(children) == 4 and all(status == "FINISHED" for status, _ in children)
    assert sorted(" ".join(tags["overrides"].split()[:2]) for _, tags in children) == [
        "layer=grpo seed=0", "layer=grpo seed=1", "layer=mgrpo seed=0", "layer=mgrpo seed=1"]
    assert all((sweep / str(j) / "heldout" / "step_000000.jsonl").is_file() for j in range(4))

    res = run_cli("report", str(sweep), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert report["keys"] == ["layer"] and report["problems"] == 8
    assert {g: v["seeds"] for g, v in report["groups"].items()} == {"grpo": [0, 1], "mgrpo": [0, 1]}
    md = (sweep / "report" / "report.md").read_text()
    assert "### grpo (n = 2 seeds: 0, 1)" in md and "### mgrpo (n = 2 seeds: 0, 1)" in md
    assert f"parent run {parent}" in res.stdout
    assert any(p.name == "report.html" for p in (tmp_path / "mlartifacts").rglob("report.html") if parent in str(p))


@pytest.mark.slow
def test_submitit_local_sweep_of_two_debug_jobs_completes(tmp_path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    res = run_cli("train", "-m", "seed=0,1", "debug=fast", "trainer.threads=1", "hydra/launcher=submitit_local",
                  "hydra.launcher.timeout_min=15", f"paths.outputs={tmp_path}", f"hydra.sweep.dir={sweep}",
                  timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in (0, 1):
        assert json.loads((sweep / str(job) / "status.json").read_text())["status"] == "FINISHED"
        assert (sweep / str(job) / "result.json").is_file()
    parent, children = _children(tmp_path / "mlflow.db")
    assert len(children) == 2 and all(status == "FINISHED" for status, _ in children)


@pytest.mark.slow
def test_a_failed_train_job_is_listed_in_one_line_and_the_sweep_exits_non_zero(tmp_path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    res = run_cli("train", "-m", f"model.path={tmp_path}/missing,null", "debug=fast", "trainer.threads=1",
                  f"paths.outputs={tmp_path}", f"hydra.sweep.dir={sweep}", timeout=900)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 of 2 sweep jobs failed: #0 (model.path={tmp_path}/missing debug=fast")
    assert "missing" in last.split("FAILED: UserError: ", 1)[1]
    assert json.loads((sweep / "1" / "status.json").read_text())["status"] == "FINISHED"
    runs = _runs(tmp_path / "mlflow.db")
    (parent,) = [r for r, (_, tags) in runs.items() if tags.get("mgrpo.kind") == "sweep"]
    assert runs[parent][0] == "FAILED"
