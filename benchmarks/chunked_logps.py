"""Memory and time of the loss pass's log-probs on the CPU: chunked lm_head against the whole logits.

A random-initialised Qwen2 with Qwen2.5's vocabulary (151,936) and a small body (hidden 64, 2 layers)
makes the (tokens x vocabulary) logits the largest tensor by far, as they are at 1.5B. Each variant
runs in a fresh subprocess: ``--rows`` completions of ``--tokens`` tokens after a 16-token prompt
(one group per row, so one sequence each), policy log-probs with gradients through
:func:`mgrpo_cli.algo.loss.completion_logps` (``chunked=True`` or ``False``) and backward; the child
reports its peak resident memory above what it held before the pass, and the pass's median time.

    python benchmarks/chunked_logps.py [--rows 8] [--tokens 128] [--repeats 3]

The last line is ``CHUNKED_LOGPS peak_mib chunked=<a> whole=<b> seconds chunked=<c> whole=<d>``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(chunked: bool, rows: int, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mgrpo_cli.algo.loss import completion_logps
    from mgrpo_cli.rollout.engine import Rollout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    prompts = torch.randint(0, 151936, (rows, 16))
    completions = torch.randint(0, 151936, (rows, tokens))
    ro = Rollout(prompts, torch.ones_like(prompts), completions, torch.ones_like(completions), [""] * rows, 1)
    index = torch.arange(rows)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(repeats):
        start = time.perf_counter()
        logps = completion_logps(model, ro, index, temperature=1.0, chunked=chunked)
        logps.sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - before) / 1024, "seconds": statistics.median(times)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["chunked", "whole"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child == "chunked", a.rows, a.tokens, a.repeats)))
        return {}
    out = {}
    for variant in ("chunked", "whole"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--rows", str(a.rows), "--tokens",
                               str(a.tokens), "--repeats", str(a.repeats)], capture_output=True, text=True, check=True,
                              cwd=ROOT)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant}: peak +{out[variant]['peak_mib']:.0f} MiB, {out[variant]['seconds']:.3f} s per pass "
              f"({a.rows} rows x {a.tokens} tokens, vocabulary 151,936)", flush=True)
    print(f"CHUNKED_LOGPS peak_mib chunked={out['chunked']['peak_mib']:.0f} whole={out['whole']['peak_mib']:.0f} "
          f"seconds chunked={out['chunked']['seconds']:.3f} whole={out['whole']['seconds']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
