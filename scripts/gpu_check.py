"""GPU check: a few MGRPO steps in bf16 on a random-initialised model with Qwen2.5-1.5B's shapes.

Nothing is downloaded: the architecture is built from the literal Qwen2.5-1.5B numbers below
(``QWEN25_1P5B``: hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 kv heads, vocab 151936,
tied embeddings) through the project's own loader (``model.random_init_layers``) with random weights,
and the project's byte tokenizer (its 260 ids lie inside the vocabulary). The steps are the real
``MGRPOModule.training_step`` (layer 1: P prompts x G samples; layer 2: k responses per prompt x H
corrections; the KL reference is a frozen copy) under a Lightning Trainer in ``bf16-true``. A random
model almost never emits EOS, so completions run to ``--max-new-tokens`` and every step does the same work.

Printed per step and summed over the steps after the first (which warms up kernels):
- rollout tokens/s: generated tokens over the time spent inside the rollout engine;
- train tokens/s: prompt + completion tokens through the loss forward/backward, over the rest of the step;
- peak GPU memory (``torch.cuda.max_memory_allocated``).

    bash scripts/gpu_check.sh                     # a GPU machine, under 5 minutes
    python scripts/gpu_check.py --tiny            # CPU smoke test: 2 layers, 64 wide, fp32

The last line is ``GPU_CHECK rollout_tokens_per_s=<x> train_tokens_per_s=<y> peak_mem_gib=<z> ...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-1.5B's config.json, the numbers that set shapes and compute (literal, no download)
QWEN25_1P5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151643, "attention_dropout": 0.0, "initializer_range": 0.02,
}
# --tiny: the same architecture family, small enough for a CPU smoke test
TINY = {**QWEN25_1P5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 2048}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test size (2 layers, 64 wide, fp32)")
    p.add_argument("--steps", type=int, default=3, help="MGRPO steps (the first is not timed)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--generations", type=int, default=8, help="layer-1 samples per prompt (G)")
    p.add_argument("--group-size", type=int, default=4, help="layer-2 corrections per input (H)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.001, help="KL weight; > 0 keeps a frozen reference copy")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    return a


def _compose(a: argparse.Namespace, model_dir: Path, gpu: bool):
    from hydra import compose, initialize_config_dir

    from mgrpo_cli.config import conf_dir, register_configs

    shape = TINY if a.tiny else QWEN25_1P5B
    overrides = [
        "model=qwen1.5b", f"model.path={model_dir}", f"model.random_init_layers={shape['num_hidden_layers']}",
        f"model.max_completion_length={a.max_new_tokens}", "layer=mgrpo", "dataset=arith", "logger=none",
        "warmup.enabled=false", f"trainer={'gpu' if gpu else 'cpu'}", f"grpo.prompts_per_step={a.prompts}",
        f"grpo.num_generations={a.generations}", f"layer.group_size={a.group_size}", f"grpo.beta={a.beta}",
        f"grpo.micro_batch_tokens={a.micro_batch_tokens}", "grpo.lr=5e-7", f"trainer.max_steps={a.steps}",
        f"paths.outputs={model_dir / 'outputs'}",
    ]
    if not gpu:
        overrides += ["model.attn_implementation=eager", "model.gradient_checkpointing=false"]
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class TimedEngine:
    """Wraps the module's rollout engine: time inside ``generate`` and the tokens it produced."""

    def __init__(self, engine, sync):
        self.engine, self.sync = engine, sync
        self.seconds, self.generated, self.through_loss = 0.0, 0, 0

    def generate(self, prompts, **kw):
        self.sync()
        start = time.perf_counter()
        ro = self.engine.generate(prompts, **kw)
        self.sync()
        self.seconds += time.perf_counter() - start
        self.generated += int(ro.completion_mask.sum())
        self.through_loss += int(ro.prompt_mask.sum() + ro.completion_mask.sum())
        return ro

    def __getattr__(self, name):
        return getattr(self.engine, name)


def run(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    import lightning as L
    import torch

    from mgrpo_cli import build
    from mgrpo_cli.modeling import build_byte_tokenizer

    gpu = torch.cuda.is_available() and not a.tiny
    if not gpu and not a.tiny:
        raise SystemExit("gpu_check: no CUDA device; use --tiny for the CPU smoke test")
    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    workdir = Path(tempfile.mkdtemp(prefix="mgrpo_gpu_check_"))
    shape = TINY if a.tiny else QWEN25_1P5B
    (workdir / "config.json").write_text(json.dumps(shape))
    build_byte_tokenizer().save_pretrained(workdir)
    cfg = _compose(a, workdir, gpu)

    build.setup_runtime(cfg)  # what `mgrpo train` sets: threads, seeds, attention backends
    start = time.perf_counter()
    with device:  # initialise the random weights on the device itself (fast on a GPU)
        policy, tok, _ = build.policy(cfg)
    params = sum(p.numel() for p in policy.parameters())
    logging.info("built %.3fB parameters (%s, %s) in %.1f s", params / 1e9, policy.dtype, device,
                 time.perf_counter() - start)

    reward_fn = build.reward(cfg)
    module = build.module(cfg, policy, tok, reward_fn)  # a frozen KL reference when beta > 0
    timed = TimedEngine(module.engine, sync)
    module.engine = timed
    train_dl = build.train_loader(build.problem_stream(cfg), module)
    steps: list[dict] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0, self.r0 = time.perf_counter(), (timed.seconds, timed.generated, timed.through_loss)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            seconds = time.perf_counter() - self.t0
            rollout_s, gen, through = (x - y for x, y in zip((timed.seconds, timed.generated, timed.through_loss),
                                                             self.r0))
            steps.append({"step": len(steps) + 1, "seconds": seconds, "rollout_seconds": rollout_s,
                          "generated_tokens": gen, "loss_tokens": through})
            print(f"step {len(steps)}: {seconds:.2f} s, rollout {rollout_s:.2f} s, "
                  f"{gen / max(rollout_s, 1e-9):.0f} generated tokens/s, "
                  f"{through / max(seconds - rollout_s, 1e-9):.0f} train tokens/s", flush=True)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision=cfg.trainer.precision,
                        max_steps=a.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[StepTimer()], default_root_dir=str(workdir))
    try:
        trainer.fit(module, train_dataloaders=train_dl)
    finally:
        reward_fn.close()
    timed_steps = steps[1:]
    rollout_s = sum(s["rollout_seconds"] for s in timed_steps)
    train_s = sum(s["seconds"] - s["rollout_seconds"] for s in timed_steps)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "parameters": params, "dtype": str(policy.dtype).replace("torch.", ""),
        "precision": cfg.trainer.precision, "steps": len(steps),
        "rollout_tokens_per_s": sum(s["generated_tokens"] for s in timed_steps) / max(rollout_s, 1e-9),
        "train_tokens_per_s": sum(s["loss_tokens"] for s in timed_steps) / max(train_s, 1e-9),
        "median_step_s": statistics.median(s["seconds"] for s in timed_steps),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
        "per_step": steps,
    }
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(f"GPU_CHECK rollout_tokens_per_s={result['rollout_tokens_per_s']:.0f} "
          f"train_tokens_per_s={result['train_tokens_per_s']:.0f} peak_mem_gib={result['peak_mem_gib']:.2f} "
          f"median_step_s={result['median_step_s']:.2f} params={params / 1e9:.3f}B dtype={result['dtype']} "
          f"device={result['device'].replace(' ', '_')}", flush=True)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(ROOT))
    run()
