"""The adapter between Hydra and the one-line errors (mgrpo_cli/cli/hydra_errors.py), against the pinned
Hydra: the function it wraps is the one ``hydra.main`` reports through, and the errors Hydra raises for
bad overrides of the real conf/ read as one line each (end to end through the CLI: tests/cli/test_errors.py)."""
from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mgrpo_cli.cli import hydra_errors
from mgrpo_cli.config.schema import conf_dir, register_configs

ROOT = Path(__file__).resolve().parents[2]


def test_the_pinned_hydra_is_the_one_installed():
    pinned = re.search(r'"hydra-core==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert hydra.__version__ == pinned


def test_install_wraps_the_report_hydra_main_calls_once():
    import hydra._internal.utils as hydra_utils

    hydra_errors.install()
    wrapped = hydra_utils.run_and_report
    hydra_errors.install()
    assert hydra_utils.run_and_report is wrapped and wrapped.one_line
    # hydra.main's runner looks the report function up in that module when it runs
    assert "run_and_report" in hydra_utils._run_hydra.__code__.co_names
    assert hydra_utils._run_hydra.__globals__ is vars(hydra_utils)


def _compose_error(overrides: list[str]) -> BaseException:
    register_configs()
    with pytest.raises((HydraException, OmegaConfBaseException)) as caught:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            compose(config_name="train", overrides=overrides)
    return caught.value


@pytest.mark.parametrize("overrides, line", [
    (["seed=abc"], "seed=abc: expected an integer"),
    (["layer.select=worng"], "layer.select=worng: expected one of all, wrong, sample (did you mean wrong?)"),
    (["grpo.num_generatons=4"], "grpo.num_generatons=4: grpo has no key 'num_generatons'; the closest is "
                                "grpo.num_generations (--cfg job prints every key)"),
    (["model=qwen9b"], "model=qwen9b: no such model config; choose one of"),
    (["+seed=1"], "+seed=1: seed exists already; set it without the +: seed=1"),
])
def test_composition_errors_read_as_one_line(overrides, line):
    got = hydra_errors.hydra_error_line(_compose_error(overrides))
    assert got is not None and "\n" not in got and got.startswith(line)


def test_other_errors_are_left_to_hydra():
    assert hydra_errors.hydra_error_line(ValueError("not Hydra's")) is None
