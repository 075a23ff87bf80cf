"""Decode speed on the CPU: this tree's ``sample`` against the one of another git revision, alternated.

Both sides load ``mgrpo_cli/rollout/engine.py`` and ``mgrpo_cli/rollout/decode.py`` as module copies in one process
(the other revision's through ``git show``), so they run on the same model with the same load from
other work. The model is the shipped warm start (fp32, one thread): 8 prompts x 8 samples at
temperature 1, either as a training step's rollout (32 new tokens, stopping at EOS) or without EOS
(64 new tokens). Each pair is one ``sample`` call per side, in alternating order; the result is the
median of the per-pair ratios (this tree / the base). ``--control`` compares the base with a second
copy of itself: the spread to expect from noise alone.

    python benchmarks/decode_speed.py --base main --pairs 150 [--control]

The last line is ``DECODE_SPEED this/base train_like=<ratio> no_eos=<ratio>``.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("decode", "rollout")


def _load_copy(package: str, sources: dict[str, str]):
    """Execute rollout.py and decode.py as ``package.decode`` / ``package.rollout``; returns the rollout module."""
    pkg = types.ModuleType(package)
    pkg.__path__ = []
    sys.modules[package] = pkg
    for name in FILES:
        src = sources[name].replace("from mgrpo_cli.rollout.decode import", f"from {package}.decode import")
        module = types.ModuleType(f"{package}.{name}")
        sys.modules[module.__name__] = module
        exec(compile(src, f"{package}/{name}.py", "exec"), module.__dict__)
    return sys.modules[f"{package}.rollout"]


def _sources(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {n: (ROOT / "mgrpo_cli" / f"{n}.py").read_text() for n in FILES}
    return {n: subprocess.run(["git", "show", f"{rev}:mgrpo_cli/{n}.py"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout for n in FILES}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="main", help="git revision to compare against")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--control", action="store_true", help="the base against a copy of itself")
    args = ap.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from mgrpo_cli.cli import build
    from mgrpo_cli.config.schema import ModelConfig
    from mgrpo_cli.models.loading import load_policy
    from mgrpo_cli.training.warmup import SHIPPED

    torch.set_num_threads(1)
    base = _load_copy("decode_base", _sources(args.base))
    this = _load_copy("decode_this", _sources(args.base if args.control else None))
    path = next(p for p in sorted(SHIPPED.iterdir()) if (p / "warmup.json").is_file())
    model, tok = load_policy(build.model_spec(OmegaConf.structured(ModelConfig(path=str(path), dtype="float32"))))
    model.eval()
    prompts = [f"{a}+{b}-{c}\n" for a, b, c in
               [(12, 7, 5), (3, 4, 1), (18, 9, 2), (7, 6, 3), (25, 13, 8), (9, 9, 9), (40, 2, 11), (5, 31, 6)]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cases = {"train_like": dict(n=8, max_new_tokens=32, eos_token_id=tok.eos_token_id),
             "no_eos": dict(n=8, max_new_tokens=64, eos_token_id=-1)}
    result = {}
    for name, kw in cases.items():
        ratios, times = [], {"base": [], "this": []}
        for i in range(args.pairs):
            pair = {}
            for side, mod in (("base", base), ("this", this)) if i % 2 == 0 else (("this", this), ("base", base)):
                start = time.perf_counter()
                mod.sample(model, enc.input_ids, enc.attention_mask, pad_token_id=tok.pad_token_id, temperature=1.0,
                           generator=torch.Generator().manual_seed(i), **kw)
                pair[side] = time.perf_counter() - start
                times[side].append(pair[side])
            ratios.append(pair["this"] / pair["base"])
        result[name] = statistics.median(ratios)
        print(f"{name}: this/base median of {args.pairs} per-pair ratios {result[name]:.3f}; median call "
              f"base {1e3 * statistics.median(times['base']):.1f} ms, this {1e3 * statistics.median(times['this']):.1f} ms",
              flush=True)
    print(f"DECODE_SPEED this/base{' (control)' if args.control else ''} "
          + " ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
