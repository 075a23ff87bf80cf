"""scripts/gpu_check.py on the CPU with --tiny: every part runs and its JSON holds the measured rates,
the bounds of scripts/perf.py for the same shapes, and the fractions between them (the
measured rates are the machine's: only their presence is checked)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _check_decode_and_loss(out: dict, script, compiled: bool):
    import perf

    shape = perf.ModelShape.from_config(script.TINY)
    hw = out["hardware"]
    assert hw["nominal"] and hw["device"] == "cpu"
    gpu = perf.GPU("cpu", hw["bandwidth_bytes_per_s"], hw["peak_flops"])
    dec = out["decode"]
    assert dec["batch"] == 16 and dec["new_tokens"] == 24
    assert dec["bound"] == perf.generation_bound(shape, gpu, 4, 4, 16, 24, weight_bytes=4, kv_bytes=4)
    names = ["lean", "generate-static-eager", "generate-static-compiled", "lean-static"] + (["lean-static-compiled"]
                                                                                            if compiled else [])
    assert list(dec["runs"]) == names  # the targets first
    for name in names:
        run = dec["runs"][name]
        assert run["tokens"] == 16 * 24  # every row ran to the end
        assert run["tokens_per_s"] > 0 and run["fraction_of_bound"] > 0
    assert not dec["runs"]["generate-static-compiled"]["compiles_on_this_device"]
    assert dec["lean_over_generate"] > 0
    assert list(out["loss"]["runs"])[:3] == ["ckpt", "ckpt+whole", "no-ckpt"]
    assert [r["chunked_logps"] for r in list(out["loss"]["runs"].values())[:3]] == [False] * 3  # vocabulary 260
    for variant, shared in (("ckpt", False), ("ckpt+whole", False), ("no-ckpt", True)):
        run = out["loss"]["runs"][variant]
        want = perf.loss_pass_flops(shape, 2, 4, 16, 16, reference=True, policy_shared_prompts=shared)
        assert run["flops"] == want["flops"] and run["tokens"] == 2 * 16 + 8 * 16
        assert run["seconds"] > 0 and run["mfu"] > 0


def test_gpu_check_tiny_decode_loss_and_one_step_run(tmp_path, capsys):
    import perf

    script = _script()
    assert perf.parameters(perf.ModelShape.from_config(script.QWEN25_1P5B)) == 1_543_714_304  # the published count
    path = tmp_path / "g.json"
    script.run(["--tiny", "--json", str(path), "--steps-models", "tiny", "--steps-precisions", "32-true",
                "--decoders", "lean,lean-static", "--loss-variants", "ckpt,ckpt+whole,no-ckpt"])  # compiling the step takes ~25 s on the CPU: the slow test
    out = json.loads(path.read_text())
    _check_decode_and_loss(out, script, compiled=False)
    step = out["steps"]["tiny/32-true"]
    assert step["precision"] == "32-true" and len(step["per_step"]) == 2 and step["median_step_s"] > 0
    assert 0 < step["per_step"][1]["generated_tokens"] <= 2 * 64 * 32  # layer 1 and layer 2: 64 rows of <= 32
    assert capsys.readouterr().out.splitlines()[-1].startswith("GPU_CHECK decode_tokens_per_s=")


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_part_and_precision(tmp_path):
    script = _script()
    path = tmp_path / "g.json"
    script.run(["--tiny", "--json", str(path)])
    out = json.loads(path.read_text())
    _check_decode_and_loss(out, script, compiled=True)
    compiled = out["decode"]["runs"]["lean-static-compiled"]
    assert compiled["unique_graphs"] == 1 and compiled["cudagraph_skips"] >= 1  # one graph; no CUDA graph on a CPU
    for model in ("tiny", "1.5b"):
        for precision in ("32-true", "bf16-mixed", "bf16-true"):
            assert out["steps"][f"{model}/{precision}"]["median_step_s"] > 0
        assert out["steps"][f"{model}/bf16_true_over_fp32"] > 0
    assert out["steps"]["tiny/bf16-true+cudnn"]["cudnn_sdp"]


def test_gpu_check_budget_skips_parts(tmp_path):
    script = _script()
    path = tmp_path / "g.json"
    script.run(["--tiny", "--json", str(path), "--budget-s", "0", "--parts", "decode,steps"])
    out = json.loads(path.read_text())
    assert out["decode"] == {"skipped": "--budget-s 0 reached"} and "skipped" in out["steps"]
