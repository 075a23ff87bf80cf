"""mgrpo outside its clone: a wheel built from the repository, installed into another folder, trains and
evaluates from a third folder; benchmarks come from the data folder (``MGRPO_DATA_DIR``), and a Hub set
(a local folder, through the same ``datasets.load_dataset`` call a networked user makes) fills it.

The wheel is built without build isolation (the test environment's setuptools, nothing downloaded) from
a copy of the files it is made of, so the clone gets no build folders, and installed with ``--target``:
the installed code, ``conf/`` and warm start come first on ``PYTHONPATH``, the dependencies from the test
environment.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import DATA, ROOT, requires_data

from mgrpo_cli import __version__

WHEEL_SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "conf", "mgrpo_cli"]


def _pip(*args: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, str]:
    """(the folder the wheel is installed in, pip's output of the build)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src), cwd=root)
    (wheel,) = (root / "dist").glob("mgrpo-*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel), cwd=root)
    return root / "site", built


def _run(site: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``mgrpo <args>`` as installed in ``site``, from ``cwd``, without the clone on the path."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MGRPO_CONF_DIR")}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(site / "bin" / "mgrpo"), *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**base, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "COLUMNS": "120", **env})


def test_wheel_builds_without_warnings_and_carries_conf_and_the_warm_start(installed, tmp_path):
    site, build_output = installed
    assert "warning" not in build_output.lower(), build_output  # setuptools' own, e.g. on package data
    assert (site / "mgrpo_cli" / "conf" / "train.yaml").is_file()
    assert (site / "mgrpo_cli" / "conf" / "dataset" / "gsm8k.yaml").is_file()
    assert len(list((site / "mgrpo_cli" / "warmstart").glob("*/model.safetensors"))) >= 1
    assert _run(site, ["--version"], tmp_path).stdout.strip() == f"mgrpo {__version__}"
    probe = subprocess.run(
        [sys.executable, "-c", "import mgrpo_cli; from mgrpo_cli.config.schema import conf_dir; "
                               "print(mgrpo_cli.__file__); print(conf_dir())"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    code, conf = probe.stdout.split()
    assert Path(code).is_relative_to(site) and Path(conf) == site / "mgrpo_cli" / "conf", probe.stdout + probe.stderr


def test_installed_wheel_trains_and_evaluates_outside_the_clone(installed, tmp_path):
    """Side by side: ``train debug=fast``; ``eval dataset=gsm8k eval.limit=5`` on the data folder; and
    ``eval`` on a Hub set that is a local folder, with the Hub offline, into an empty data folder."""
    requires_data("gsm8k", "test.jsonl")
    site, _ = installed
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a, b in [(3, 4), (10, 5), (7, 8), (2, 9)]]
    (hub / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = {
        "train": ["train", "debug=fast", "trainer.threads=1", f"paths.outputs={tmp_path / 'train'}"],
        "eval": ["eval", "dataset=gsm8k", "eval.limit=5", "trainer.threads=1", f"paths.outputs={tmp_path / 'eval'}",
                 f"hydra.run.dir={tmp_path / 'eval' / 'run'}"],
        "hub": ["eval", "dataset=gsm8k", "eval.limit=3", "trainer.threads=1", f"dataset.hub_name={hub}",
                "dataset.hub_config=null", f"paths.data={tmp_path / 'data'}", f"paths.outputs={tmp_path / 'hub-eval'}",
                f"hydra.run.dir={tmp_path / 'hub-eval' / 'run'}"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(jobs, pool.map(lambda args: _run(site, args, tmp_path / "elsewhere",
                                                         MGRPO_DATA_DIR=str(DATA), HF_DATASETS_OFFLINE="1"),
                                       jobs.values()), strict=True))
    for name, res in done.items():
        assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"

    (run,) = (tmp_path / "train" / "train" / "runs").iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "FINISHED"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "export" / "config.json").is_file()
    with sqlite3.connect(tmp_path / "train" / "mlflow.db") as con:
        assert con.execute("select status from runs").fetchall() == [("FINISHED",)]

    summary = json.loads((tmp_path / "eval" / "run" / "summary.json").read_text())
    assert summary["n"] == 5 and summary["skipped_rows"] == 0
    # the eval's policy is the warm start shipped inside the wheel
    assert f"reusing {site / 'mgrpo_cli' / 'warmstart'}/" in done["eval"].stdout + done["eval"].stderr

    assert json.loads((tmp_path / "hub-eval" / "run" / "summary.json").read_text())["n"] == 3
    written = (tmp_path / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == rows
