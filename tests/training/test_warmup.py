"""The warm start (training/warmup.py): keyed by ``warmup.seed``, not the run's seed, so every run seed
starts from the shipped warm start; a new one is built once under a lock and appears whole (an atomic
rename); a stop request ends the warm-up with nothing saved, and ``mgrpo train`` then exits 75."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose, run_cli

from mgrpo_cli.cli import build
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.training import warmup
from mgrpo_cli.training.warmup import SHIPPED, WarmupStopped, cache_key


def _spec(tmp_path: Path, *overrides: str):
    return build.warmup_spec(compose("train", [f"warmup.cache_dir={tmp_path}", *overrides]))


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_every_run_seed_has_the_shipped_warm_start(tmp_path, seed):
    key = cache_key(_spec(tmp_path, f"seed={seed}"))
    assert (SHIPPED / key / "warmup.json").is_file(), f"{key} is not shipped: {sorted(p.name for p in SHIPPED.iterdir())}"
    assert cache_key(_spec(tmp_path, f"seed={seed}", "warmup.seed=1")) != key  # the warm-up's own seed keys it


def test_train_seed_1_reuses_the_shipped_warm_start(tmp_path):
    res = run_cli("train", "seed=1", "warmup.only=true", "logger=none", f"paths.outputs={tmp_path}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"reusing {SHIPPED}" in out and "training the tiny model" not in out, out[-3000:]
    assert not (tmp_path / "warmstart").exists()


def test_a_new_warm_start_is_built_once_and_appears_whole(tmp_path, monkeypatch):
    spec = _spec(tmp_path, "warmup.seed=123")
    builds, seen_during = [], []

    def slow_train(spec, grader_correct, should_stop):
        builds.append(threading.get_ident())
        time.sleep(1.0)  # the other job arrives while this one builds
        seen_during.append(sorted(p.name for p in tmp_path.iterdir()))
        tok = build_byte_tokenizer()
        return build_tiny_model(spec.model, tok, seed=0), tok, {"steps": 1}

    monkeypatch.setattr(warmup, "_train", slow_train)
    found: list[Path] = []
    jobs = [threading.Thread(target=lambda: found.append(warmup.warm_start(spec, None))) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    key = cache_key(spec)
    assert len(builds) == 1 and found == [tmp_path / key] * 2
    assert seen_during == [[f"{key}.lock"]]  # while building: no folder under the key yet
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key, f"{key}.lock"])  # no partial folder left
    assert json.loads((tmp_path / key / "warmup.json").read_text()) == {"steps": 1}


def test_a_stop_request_ends_the_warm_up_with_nothing_saved(tmp_path):
    spec = _spec(tmp_path, "warmup.seed=123", "warmup.steps=50")
    with pytest.raises(WarmupStopped, match="warm-up step 1"):
        warmup.warm_start(spec, None, should_stop=lambda: True)
    assert [p.name for p in tmp_path.iterdir()] == [f"{cache_key(spec)}.lock"]


def test_sigterm_during_the_warm_up_exits_75_with_nothing_half_written(tmp_path):
    exe = Path(sys.executable).parent / "mgrpo"
    log = tmp_path / "train.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(exe), "train", "debug=fast", "warmup.seed=99", "warmup.steps=5000",
                                 "warmup.eval_every=5000", "logger=none", "trainer.threads=1",
                                 f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120"))
    deadline = time.monotonic() + 240
    while "training the tiny model" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(2.0)  # into the warm-up's steps
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, log.read_text()[-3000:]
    assert "warm-up stopped at step" in log.read_text()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "KILLED"
    assert [p.name for p in (tmp_path / "warmstart").iterdir()] == [p.name for p in (tmp_path / "warmstart").glob("*.lock")]
