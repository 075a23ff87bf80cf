"""Eval throughput: `mgrpo eval`'s batched generation against one `model.generate` call per problem.

Same model (the tiny model's shipped warm start, or --model-dir), same prompts (GSM8K test), same
lengths: greedy, prompts cut to --max-prompt-length tokens, and every completion exactly
--max-new-tokens long (EOS ignored on both sides, so neither side gains from stopping early;
--stop-at-eos compares natural lengths instead).

The batched side is what `mgrpo eval` runs: every problem of the set (1,319 by default), sorted by
prompt length, --batch-size at a time. One-at-a-time generation costs the same per problem whatever
the other problems are, so its rate is measured on a random subset (--n-single problems, seed 0), and
the completions of that subset are compared with the batched ones (they must be identical).
``--n N`` times the first N problems only on both sides (``--n 64`` = one padded batch, the worst case).

The last line is the ratio of problems per second, batched / one at a time (target: >= 5).

    python benchmarks/eval_speed.py [--n-single 128] [--batch-size 64] [--threads 2] [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None, help="problems on the batched side (default: all)")
    ap.add_argument("--n-single", type=int, default=128, help="problems timed one at a time")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-at-eos", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from conftest import compose
    from transformers.utils import logging as hf_logging

    from mgrpo_cli.algo.solve import SolveSpec, solve
    from mgrpo_cli.cli import build
    from mgrpo_cli.data.loaders import load_problems
    from mgrpo_cli.rollout.engine import HFEngine

    hf_logging.set_verbosity_error()  # generate() warns at every call that EOS -1 never stops it
    cfg = compose("eval", ["dataset=gsm8k", "logger=none"] + ([f"model.path={args.model_dir}"] if args.model_dir else []))
    problems = load_problems(build.dataset_spec(cfg.dataset), "test", limit=args.n, seed=0).problems
    single = sorted(random.Random(0).sample(range(len(problems)), min(args.n_single, len(problems))))
    with build.reward(cfg) as reward_fn:
        grader = reward_fn.grader
        model, tok, source = build.policy(cfg, build.warm_start(cfg, reward_fn))
        model.eval()
        renderer = build.renderer(cfg, tok, model)
        questions, golds = [p.question for p in problems], [p.answer for p in problems]
        engine = HFEngine(model, tok, max_prompt_length=args.max_prompt_length, stop_at_eos=args.stop_at_eos)

        t = time.perf_counter()
        spec = SolveSpec(args.max_new_tokens, args.max_new_tokens, batch_size=args.batch_size)
        solved = solve(engine, renderer, grader.correct, questions, golds, spec)
        batched = time.perf_counter() - t

        tok.truncation_side = "left"
        t = time.perf_counter()
        one_by_one = []
        for i in single:
            enc = tok([renderer.render(questions[i])], return_tensors="pt", add_special_tokens=False,
                      truncation=True, max_length=args.max_prompt_length)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     eos_token_id=list(engine.eos_token_id), pad_token_id=tok.pad_token_id)
            one_by_one.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
        one_at_a_time = time.perf_counter() - t
    same = sum(solved.t1_texts[i][0] == text for i, text in zip(single, one_by_one, strict=True))
    result = {"model": source, "threads": args.threads, "batched_problems": len(problems),
              "batched_seconds": batched, "batched_problems_per_s": len(problems) / batched,
              "single_problems": len(single), "single_seconds": one_at_a_time,
              "generate_problems_per_s": len(single) / one_at_a_time,
              "identical_completions": f"{same}/{len(single)}"}
    print(json.dumps(result, indent=1))
    print(f"EVAL_SPEED ratio={result['batched_problems_per_s'] / result['generate_problems_per_s']:.2f}")


if __name__ == "__main__":
    main()
