"""Exact resume and preemption through the real CLI (mgrpo_cli/cli/resume.py, training/lifecycle.py, cli/train.py).

A small run whose weights really change (one-digit answers graded with the last-number fallback,
as in test_ddp: about one completion in ten is right, so groups have reward variance) is trained
once without interruption; other runs of the same config are stopped between two checkpoints
(SIGKILL, SIGTERM) and continued with ``mgrpo train resume=<run folder>``. A continued run must end
where the uninterrupted one ended: the same held-out metrics, the same exported tensors bit for
bit, one MLflow run holding every step once with the values the uninterrupted run logged.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from mgrpo_cli.cli.resume import SAFE_OVERRIDES, prepare_argv
from mgrpo_cli.errors import UserError

STEPS, EVERY = 12, 4
# torch's default thread count (the test processes get OMP_NUM_THREADS=2): on CPU a resume is exact at any
# fixed thread count, and 2 threads is where an order-dependent parallel sum would show
RUN = ["debug=fast", "warmup.enabled=false", "reward.last_number_fallback=true",
       "grpo.num_generations=8", "model.max_completion_length=32", "grpo.beta=0.05", f"trainer.max_steps={STEPS}",
       f"trainer.checkpoint_every={EVERY}", "trainer.val_every=1"]  # every step: a stop always lands on a validation


def _train(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    res = run_cli("train", *args, f"paths.outputs={out}", f"hydra.run.dir={out / 'run'}", timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(out, *RUN, *digits)
    return out


def _start(out: Path, *args: str) -> subprocess.Popen:
    """``mgrpo train`` in its own process group (a signal reaches it and its grader worker, as on a cluster)."""
    exe = Path(sys.executable).parent / "mgrpo"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", COLUMNS="120")
    log = open(out / "first.log", "w")
    return subprocess.Popen([str(exe), "train", *args, f"paths.outputs={out}", f"hydra.run.dir={out / 'run'}"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _logged_step(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            (step,) = con.execute("select max(step) from metrics where key = 'train/step_time'").fetchone()
    except sqlite3.Error:
        return -1
    return -1 if step is None else step


def _signal_after(proc: subprocess.Popen, out: Path, step: int, sig: int, timeout: float = 240) -> int:
    """Send ``sig`` to the run's process group once MLflow holds step ``step``; the run's exit code."""
    deadline = time.monotonic() + timeout
    while _logged_step(out / "mlflow.db") < step:
        assert proc.poll() is None, (out / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


def _metrics(db: Path) -> dict[tuple[str, int], list[float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, step, value from metrics order by key, step, timestamp").fetchall()
    out: dict[tuple[str, int], list[float]] = {}
    for key, step, value in rows:
        out.setdefault((key, step), []).append(value)
    return out


def _runs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, status, start_time, end_time from runs").fetchall()


def _checkpoint_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False, mmap=True)["global_step"]


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _assert_same_run(reference: Path, out: Path, steps: int = STEPS) -> None:
    """``out`` ended where ``reference`` ended, and its one MLflow run holds every step once."""
    from safetensors.torch import load_file

    ref, run = reference / "run", out / "run"
    assert json.loads((run / "result.json").read_text()) == json.loads((ref / "result.json").read_text())
    a, b = load_file(ref / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (run_id, status, start, end), = _runs(out / "mlflow.db")
    assert status == "FINISHED" and end > start and _status(run) == {"status": "FINISHED", "error": None,
                                                                      "mlflow_run_id": run_id}
    want, got = _metrics(reference / "mlflow.db"), _metrics(out / "mlflow.db")
    assert got.keys() == want.keys()  # every step of every metric, validation included, and nothing more
    assert {s for k, s in got if k == "train/step_time"} == set(range(steps))
    for key, values in got.items():
        if "step_time" not in key[0]:  # a step done again logs the value it logged the first time
            assert set(values) == set(want[key]), key


def test_sigkill_between_checkpoints_then_resume_is_the_uninterrupted_run(reference, digits, tmp_path):
    step = random.randint(EVERY, 2 * EVERY - 2)  # logged step s = global step s + 1: past the checkpoint at EVERY
    proc = _start(tmp_path, *RUN, *digits)
    assert _signal_after(proc, tmp_path, step, signal.SIGKILL) == -signal.SIGKILL
    run = tmp_path / "run"
    assert EVERY <= _checkpoint_step(run) < STEPS and not (run / "result.json").exists()
    assert _status(run)["status"] == "RUNNING"  # nothing runs after SIGKILL
    assert [status for _, status, _, _ in _runs(tmp_path / "mlflow.db")] == ["RUNNING"]

    res = run_cli("train", f"resume={run}", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(reference, tmp_path)


def test_a_truncated_newest_checkpoint_resumes_exactly_from_the_one_before(reference, digits, tmp_path):
    proc = _start(tmp_path, *RUN, *digits)
    assert _signal_after(proc, tmp_path, 2 * EVERY, signal.SIGKILL) == -signal.SIGKILL
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    assert _checkpoint_step(run) >= 2 * EVERY
    previous = torch.load(checkpoints / "last-1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert previous == _checkpoint_step(run) - EVERY  # trainer.keep_checkpoints=2 by default
    data = (checkpoints / "last.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(data[: len(data) // 3])  # a node failure cut the write short

    res = run_cli("train", f"resume={run}", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    warnings = [line for line in (res.stdout + res.stderr).splitlines() if "does not load" in line]
    assert len(warnings) == 1 and "last-1.ckpt" in warnings[0], warnings
    _assert_same_run(reference, tmp_path)


def test_sigterm_finishes_the_step_checkpoints_marks_killed_and_resume_finishes(reference, digits, tmp_path):
    proc = _start(tmp_path, *RUN, *digits)
    assert _signal_after(proc, tmp_path, EVERY + 1, signal.SIGTERM) == 75
    run = tmp_path / "run"
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log and f"mgrpo train resume={run}" in log
    logged = _logged_step(tmp_path / "mlflow.db")
    assert _checkpoint_step(run) == logged + 1 < STEPS  # the step it was in finished, was logged and saved
    (run_id, status, start, end), = _runs(tmp_path / "mlflow.db")
    assert status == "KILLED" and end > start
    assert _status(run) == {"status": "KILLED", "error": None, "mlflow_run_id": run_id}

    res = run_cli("train", f"resume={run}", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(reference, tmp_path)

    # a finished run is extended only on request, in the same folder and MLflow run
    again = run_cli("train", f"resume={run}")
    assert again.returncode == 2 and "this run has finished" in again.stderr
    res = run_cli("train", f"resume={run}", f"trainer.max_steps={STEPS + 2}", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"max_steps: {STEPS + 2}" in (run / ".hydra" / "config.yaml").read_text()  # a later resume= keeps it
    assert [s for _, s, _, _ in _runs(tmp_path / "mlflow.db")] == ["FINISHED"]
    assert {s for k, s in _metrics(tmp_path / "mlflow.db") if k == "train/step_time"} == set(range(STEPS + 2))


# `mgrpo train` whose validation at global step EVERY (a checkpoint step) SIGKILLs the run's process group
# as it starts: the step's checkpoint is written, its held-out file and val/* metrics are not
_KILL_IN_VALIDATION = f"""
import os, signal, sys
from mgrpo_cli.training.module import MGRPOModule
answer = MGRPOModule.validation_step
def validation_step(self, batch, batch_idx):
    if self.trainer.state.fn == "fit" and self.trainer.global_step == {EVERY}:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return answer(self, batch, batch_idx)
MGRPOModule.validation_step = validation_step
from mgrpo_cli.__main__ import main
sys.argv = ["mgrpo", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_validation_cut_by_sigkill_is_done_again_on_resume(reference, digits, tmp_path):
    from mgrpo_cli.reporting import heldout

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", COLUMNS="120")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", _KILL_IN_VALIDATION, "train", *RUN, *digits,
                               f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              timeout=300)
    run = tmp_path / "run"
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert _checkpoint_step(run) == EVERY and not heldout.step_file(run, EVERY).exists()

    res = run_cli("train", f"resume={run}", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(reference, tmp_path)  # val/* at the cut step included
    ref = reference / "run"
    assert heldout.step_file(run, EVERY).read_text() == heldout.step_file(ref, EVERY).read_text()
    assert sorted(p.name for p in (run / heldout.FOLDER).iterdir()) == sorted(p.name for p in (ref / heldout.FOLDER).iterdir())


def test_resume_command_line_errors_are_one_line(reference, tmp_path):
    run = reference / "run"
    cases = [(["resume=" + str(tmp_path / "nowhere")], "no mgrpo train run folder there"),
             ([f"resume={run}", "grpo.lr=0.1"], "grpo.lr: cannot change when resuming"),
             (["-m", f"resume={run}"], "resume= continues one run; drop -m")]
    for args, needle in cases:
        res = run_cli("train", *args)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_prepare_argv_points_hydra_at_the_run_folder(tmp_path):
    assert prepare_argv(["seed=1", "-m"]) == ["seed=1", "-m"]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    args = prepare_argv([f"resume={tmp_path}", "trainer.max_steps=9", "hydra.verbose=true"])
    assert args[:3] == [f"resume={tmp_path}", "trainer.max_steps=9", "hydra.verbose=true"]
    assert args[3:] == [f'hydra.run.dir="{tmp_path.resolve()}"', "hydra.output_subdir=null"]
    assert set(SAFE_OVERRIDES) >= {"trainer.max_steps", "trainer.checkpoint_every_minutes"}
    with pytest.raises(UserError, match="ckpt_path: cannot change"):
        prepare_argv([f"resume={tmp_path}", "ckpt_path=/x.ckpt"])


TWO_RANKS = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("ddp_uninterrupted")
    _train(out, *RUN, *TWO_RANKS, *digits, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_two_rank_ddp_run_stopped_and_resumed_is_the_uninterrupted_run(ddp_reference, digits, tmp_path, sig):
    proc = _start(tmp_path, *RUN, *TWO_RANKS, *digits)
    code = _signal_after(proc, tmp_path, EVERY + 1, sig)
    run = tmp_path / "run"
    assert code == (75 if sig == signal.SIGTERM else -signal.SIGKILL), (tmp_path / "first.log").read_text()[-3000:]
    assert _status(run)["status"] == ("KILLED" if sig == signal.SIGTERM else "RUNNING")
    res = run_cli("train", f"resume={run}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(ddp_reference, tmp_path)
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran in the run's folder both times


def test_cfg_job_with_resume_prints_the_runs_config(reference):
    run = reference / "run"
    saved = (run / ".hydra" / "config.yaml").read_text()
    res = run_cli("train", f"resume={run}", "trainer.max_steps=40", "--cfg", "job")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "num_generations: 8" in res.stdout and "max_completion_length: 32" in res.stdout  # the run's, not the defaults
    assert "max_steps: 40" in res.stdout and f"ckpt_path: {run.resolve() / 'checkpoints' / 'last.ckpt'}" in res.stdout
    assert (run / ".hydra" / "config.yaml").read_text() == saved  # shown, not saved


@pytest.mark.slow
def test_the_default_run_killed_after_a_validation_between_checkpoints_resumes_exactly(tmp_path):
    """The default run (the shipped warm start, 300 steps, a validation every 50, a checkpoint every 100) at
    torch's default threads, SIGKILLed at step 160 (after the validation at 150, 60 steps past the checkpoint
    at 100) and resumed, ends bit for bit where the uninterrupted run ends: exported weights, held-out
    metrics, every logged step. About 3 x 6 minutes on 2 idle cores."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir()
    killed.mkdir()
    _train(ref, timeout=3600)
    proc = _start(killed)
    assert _signal_after(proc, killed, 160, signal.SIGKILL, timeout=3600) == -signal.SIGKILL
    run = killed / "run"
    assert _checkpoint_step(run) == 100 and (run / "heldout" / "step_000150.jsonl").is_file()
    res = run_cli("train", f"resume={run}", timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(ref, killed, steps=300)


# the issue-32 run: sampled validation (eval.n = 4) monitored for the two best checkpoints
MONITORED = ["trainer.monitor=val/acc_t2", "trainer.save_top_k=2", "eval.n=4"]


@pytest.mark.slow  # three runs of 12 steps, each validating 4 samples per problem at every step
def test_best_checkpoints_of_sampled_validation_and_an_exact_resume(digits, tmp_path):
    """``mgrpo train trainer.monitor=val/acc_t2 trainer.save_top_k=2 eval.n=4`` logs val/pass@4 and its
    friends, keeps the two best validations' checkpoints beside last.ckpt and exports the best; a run
    SIGKILLed between two checkpoints and resumed ends the same: results, exports, best checkpoints."""
    from safetensors.torch import load_file

    from mgrpo_cli.training.best import file_name, ranking

    ref = tmp_path / "reference"
    _train(ref, *RUN, *digits, *MONITORED, timeout=900)
    run = ref / "run"
    result = json.loads((run / "result.json").read_text())
    history = {int(s): v["acc_t2"] for s, v in result["validations"].items() if int(s) > 0}
    assert set(history) == set(range(1, STEPS + 1))  # every step validated (val_every=1), 0 = before training
    for key in ("pass@1", "pass@2", "pass@4", "maj@4", "mean@4", "acc_t1", "acc_t2", "fix_rate"):
        assert key in result["validations"][str(STEPS)], key
    top = ranking(history, "max", 2)
    assert sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt")) == sorted(file_name(s) for s, _ in top)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert result["best/acc_t2"] == top[0][1] and result["best/step"] == top[0][0]
    best = torch.load(run / "checkpoints" / file_name(top[0][0]), map_location="cpu", weights_only=False)
    exported = load_file(run / "export-best" / "model.safetensors")
    assert best["global_step"] == top[0][0]
    assert all(torch.equal(exported[k], best["state_dict"][f"policy.{k}"]) for k in exported if f"policy.{k}" in
               best["state_dict"])
    logged = _metrics(ref / "mlflow.db")
    assert ("val/pass_at_4", STEPS) in logged and ("val/maj_at_4", STEPS) in logged  # MLflow's names for '@'

    out = tmp_path / "killed"
    out.mkdir()
    proc = _start(out, *RUN, *digits, *MONITORED)
    assert _signal_after(proc, out, random.randint(EVERY, 2 * EVERY - 2), signal.SIGKILL, timeout=900) == -signal.SIGKILL
    res = run_cli("train", f"resume={out / 'run'}", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(ref, out)
    names = sorted(p.name for p in (out / "run" / "checkpoints").glob("best-*.ckpt"))
    assert names == sorted(file_name(s) for s, _ in top)
    a, b = load_file(run / "export-best" / "model.safetensors"), load_file(out / "run" / "export-best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
