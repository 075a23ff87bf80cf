"""The default `mgrpo train` (minutes; `nox -s slow`): held-out gains of the embedded task."""
import json

import pytest
from conftest import run_cli


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["mgrpo", "grpo"])
def test_default_run_learns(tmp_path, layer):
    run = tmp_path / "run"
    res = run_cli("train", f"layer={layer}", f"paths.outputs={tmp_path}", f"hydra.run.dir={run}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["end/n"] >= 200
    # measured (README): +12 to +19 points in 300 steps over two seeds; 400 problems give about +-2.5 of noise
    assert result["end/acc_t1"] >= result["start/acc_t1"] + 0.08
    if layer == "mgrpo":
        assert result["end/acc_t2"] >= result["end/acc_t1"]
        assert result["end/delta_i2c"] > result["end/delta_c2i"]
