"""GPU check: decode, loss-pass and training-step speed at Qwen2.5-1.5B's shapes, against the hardware's bounds.

Nothing is downloaded: models are random-initialised from the literal Qwen2.5-1.5B numbers below
(``QWEN25_1P5B``: hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 kv heads, vocab 151936,
tied embeddings). The parts run in this order, each timed after a warm-up, and the JSON (``--json``)
is rewritten after each, so a run cut short keeps what it measured; ``--budget-s`` skips the parts
that would start after it.

``decode``
    B = ``--prompts`` x ``--n`` completions of exactly ``--new-tokens`` tokens (no EOS) after random
    prompts of ``--prompt-len`` tokens, sampled at temperature 1: our decoder
    (:func:`mgrpo_cli.rollout.engine.sample`, which prefills each prompt once) and the library anchor,
    transformers' ``generate`` with ``cache_implementation="static"`` (``num_return_sequences=n``;
    on CUDA generate compiles its decode step itself, ``--generate eager`` also times it with
    ``disable_compile``). Each is given as generated tokens/s and as a fraction of the bound of
    :func:`perf.generation_bound` (scripts/perf.py) (bytes over the GPU's bandwidth, FLOPs over its peak).
``loss``
    One micro-batch of the loss pass as a training step runs it (:func:`completion_logps`: policy
    forward + backward, reference forward), ``--loss-groups`` x ``--n`` rows of ``--prompt-len`` +
    ``--loss-completion-len`` tokens, in bf16, with gradient checkpointing (the 1.5B configs' default)
    and without, on the chunked log-prob path (the default at this vocabulary) and on the whole
    logits (``+whole``); its model FLOPs (:func:`perf.loss_pass_flops`: recomputation by
    checkpointing and the chunked path's second lm_head matmul not counted) over the time and the
    dense bf16 peak give the MFU, and the peak memory shows what chunking saves.
``steps``
    Whole MGRPO training steps (``MGRPOModule.training_step`` under a Lightning Trainer: layer 1 P
    prompts x G samples, layer 2 k responses x H corrections, a frozen KL reference) in
    ``32-true``, ``bf16-mixed`` (fp32 weights) and ``bf16-true`` on the tiny model (``model=tiny``,
    random weights; also ``bf16-true`` with cuDNN attention allowed again, which ``mgrpo train``
    switches off on CUDA) and at 1.5B shapes (``--steps-1p5b-new-tokens`` per completion).

``--tiny`` runs every part on the CPU with a 2-layer, 64-wide model of the same family, in fp32
(the steps part still runs all precisions), and nominal hardware numbers: a smoke test of the code
paths, not a measurement.

    bash scripts/gpu_check.sh                          # a GPU machine, under 8 minutes: outputs/gpu_check.json
    python scripts/gpu_check.py --tiny --json /tmp/g.json    # CPU smoke test

The last line is ``GPU_CHECK decode_tokens_per_s=... generate_tokens_per_s=... loss_mfu=... json=PATH``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")

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
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2}  # the byte tokenizer's ids
# --tiny on the CPU: placeholders so that the bound code runs (a CPU is not in perf.GPUS), not measured
CPU_NOMINAL = {"bandwidth": 0.02, "peak_tflops": 0.1}
PARTS = ("decode", "loss", "steps")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
# model.dtype for each trainer.precision in the steps part (bf16-mixed keeps fp32 master weights)
DTYPE_OF = {"32-true": "float32", "bf16-mixed": "float32", "bf16-true": "bfloat16"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: every part at 2 layers x 64 wide, fp32")
    p.add_argument("--json", type=Path, default=None, help="write every result here (rewritten after each part)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in TB/s (overrides the table)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak in TFLOP/s (overrides the table)")
    p.add_argument("--prompts", type=int, default=32, help="decode: distinct prompts")
    p.add_argument("--n", type=int, default=8, help="completions per prompt (decode and loss)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (decode and loss)")
    p.add_argument("--new-tokens", type=int, default=512, help="decode: tokens generated per row")
    p.add_argument("--decoders", default="lean,lean-static,lean-static-compiled",
                   help="decode: ours to time, of lean (the default decoder), lean-static (LeanDecoder static=True), "
                        "lean-static-compiled (experiment: its step through torch.compile reduce-overhead)")
    p.add_argument("--generate", default="eager,compiled",
                   help="decode: generate variants, of eager (disable_compile), compiled (generate's own choice: "
                        "it compiles its decode step on CUDA), none")
    p.add_argument("--loss-groups", type=int, default=6, help="loss: groups in the micro-batch")
    p.add_argument("--loss-completion-len", type=int, default=256)
    p.add_argument("--loss-iters", type=int, default=3, help="loss: timed passes (after one warm-up pass)")
    p.add_argument("--loss-variants", default="ckpt,ckpt+whole,no-ckpt",
                   help="loss: ckpt / no-ckpt (gradient checkpointing), +chunked / +whole forcing the log-prob path "
                        "(else completion_logps's default: chunked at Qwen2.5's vocabulary)")
    p.add_argument("--steps", type=int, default=3, help="steps: MGRPO steps per run (the first is not timed)")
    p.add_argument("--steps-models", default="tiny,1.5b", help="steps: tiny and/or 1.5b")
    p.add_argument("--steps-precisions", default=",".join(PRECISIONS) + ",bf16-true+cudnn",
                   help="steps on the tiny model: precisions; +cudnn allows cuDNN attention")
    p.add_argument("--steps-1p5b-precisions", default=",".join(PRECISIONS), help="steps at 1.5B shapes: precisions")
    p.add_argument("--steps-1p5b-new-tokens", type=int, default=128, help="steps at 1.5B shapes: completion budget")
    p.add_argument("--steps-1p5b-steps", type=int, default=2)
    a = p.parse_args(argv)
    a.parts = [x for x in a.parts.split(",") if x]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}, expected a subset of {PARTS}")
    if a.steps < 2 or a.steps_1p5b_steps < 2:
        p.error("--steps and --steps-1p5b-steps must be at least 2 (the first step is not timed)")
    if a.tiny:  # CPU smoke-test sizes
        a.prompts, a.n, a.prompt_len, a.new_tokens = min(a.prompts, 4), min(a.n, 4), min(a.prompt_len, 16), \
            min(a.new_tokens, 24)
        a.loss_groups, a.loss_completion_len, a.loss_iters = min(a.loss_groups, 2), min(a.loss_completion_len, 16), 1
        a.steps, a.steps_1p5b_steps, a.steps_1p5b_new_tokens = 2, 2, min(a.steps_1p5b_new_tokens, 8)
    return a


class Clock:
    """Seconds since the start, and whether a part may still start under ``--budget-s``."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self) -> bool:
        return self.elapsed() < self.budget_s


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_model(shape: dict, device, dtype):
    """A random-initialised causal LM with ``shape`` (a config.json dict), built on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def hardware(a, device) -> dict:
    """The GPU's bandwidth and peak (table or flags); nominal placeholders on the CPU."""
    import perf  # scripts/perf.py, beside this script

    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        spec = perf.gpu_spec(name, a.bandwidth, a.peak_tflops)
        nominal = False
    else:
        name = "cpu"
        spec = perf.gpu_spec(name, a.bandwidth or CPU_NOMINAL["bandwidth"], a.peak_tflops or CPU_NOMINAL["peak_tflops"])
        nominal = a.bandwidth is None
    return {"device": name, "spec": spec.name, "bandwidth_bytes_per_s": spec.bandwidth,
            "peak_flops": spec.peak_flops, "nominal": nominal, "_spec": spec}


# ---------------------------------------------------------------- decode

def _prompts(a, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.prompts, a.prompt_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def time_ours(model, ids, mask, a, device, static: bool, compiled: bool = False) -> dict:
    """Our decoder on the whole job (warm-up: the same job with 8 new tokens, or the whole job when
    the step is compiled, as the buffers' shapes follow the number of new tokens)."""
    from mgrpo_cli.rollout.engine import sample

    kw = dict(n=a.n, eos_token_id=-1, pad_token_id=0, temperature=1.0, top_p=1.0, static=static)
    with compiled_step() if compiled else _nothing() as info:
        start = time.perf_counter()
        sample(model, ids, mask, max_new_tokens=a.new_tokens if compiled else 8, **kw)
        _sync(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        out, out_mask, _ = sample(model, ids, mask, max_new_tokens=a.new_tokens, **kw)
        _sync(device)
        seconds = time.perf_counter() - start
    tokens = int(out_mask.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "warmup_s": warmup_s, **info}


class _nothing:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


class compiled_step:
    """Experiment: ``LeanDecoder.step`` of a static decoder through ``torch.compile(mode="reduce-overhead")``,
    which on CUDA replays the step as a CUDA graph (on the CPU it only compiles). The key/value buffers
    and the step counter are marked as static addresses, so that the graph may write them in place;
    ``t`` is passed as 0 (a static step does not read it), so one graph serves every step. The dict
    it yields gets torch's compile counters (``cudagraph_skips`` > 0: the graph was not captured)."""

    def __enter__(self):
        import torch

        from mgrpo_cli.rollout import decode

        self.decode, self.original = decode, decode.LeanDecoder.step
        step = torch.compile(self.original, mode="reduce-overhead", dynamic=False)

        def wrapped(dec, tokens, positions, t):
            if getattr(dec, "_marked", None) is not dec.keys[0]:  # new buffers (a new batch or generation)
                for x in dec.keys + dec.values + [dec.allowed, dec.col]:
                    torch._dynamo.mark_static_address(x)
                dec._marked = dec.keys[0]
            return step(dec, tokens, positions, 0)

        decode.LeanDecoder.step = wrapped
        self.before, self.info = self._counts(), {}
        return self.info

    @staticmethod
    def _counts() -> dict:
        from torch._dynamo.utils import counters

        return {"unique_graphs": counters["stats"]["unique_graphs"],
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}

    def __exit__(self, *exc):
        self.decode.LeanDecoder.step = self.original
        self.info.update({k: v - self.before[k] for k, v in self._counts().items()})
        return False


def time_generate(model, ids, mask, a, device, compiled: bool) -> dict:
    """transformers' generate with its static cache on the same job. The warm-up (8 new tokens) uses a
    cache of the full job's length, so a compiled decode step is compiled there and reused."""
    import torch

    model.generation_config.eos_token_id = None  # every row runs to max_new_tokens, as ours does
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=a.n, pad_token_id=0,
              cache_implementation="static", max_cache_len=a.prompt_len + a.new_tokens + 1,
              disable_compile=not compiled)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **kw)
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                             min_new_tokens=a.new_tokens, **kw)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "warmup_s": warmup_s,
            "compile_requested": compiled, "compiles_on_this_device": compiled and device.type == "cuda"}


def part_decode(a, shape: dict, device, dtype, hw: dict, result: dict, save, clock: Clock) -> None:
    import perf  # scripts/perf.py, beside this script

    model = random_model(shape, device, dtype)
    ids, mask = _prompts(a, shape["vocab_size"], device)
    nbytes = 2 if str(dtype).endswith("16") else 4
    bound = perf.generation_bound(perf.ModelShape.from_config(shape), hw["_spec"], a.prompts, a.n, a.prompt_len,
                                  a.new_tokens, weight_bytes=nbytes, kv_bytes=nbytes)
    part = result["decode"] = {"batch": a.prompts * a.n, "prompts": a.prompts, "n": a.n, "prompt_len": a.prompt_len,
                               "new_tokens": a.new_tokens, "dtype": str(dtype).replace("torch.", ""),
                               "bound": bound, "runs": {}}
    runs = [(d, time_ours, {"static": d.startswith("lean-static"), "compiled": d == "lean-static-compiled"})
            for d in a.decoders.split(",") if d]
    runs += [(f"generate-static-{g}", time_generate, {"compiled": g == "compiled"})
             for g in a.generate.split(",") if g and g != "none"]
    first = ["lean", "generate-static-eager", "generate-static-compiled"]  # the targets before experiments
    runs.sort(key=lambda r: first.index(r[0]) if r[0] in first else len(first))
    for name, fn, kw in runs:
        if not clock.allows():
            part["runs"][name] = {"skipped": f"--budget-s {a.budget_s:.0f} reached"}
            continue
        log.info("decode: %s, %d rows x %d new tokens", name, a.prompts * a.n, a.new_tokens)
        try:
            r = fn(model, ids, mask, a, device, **kw)
            r["fraction_of_bound"] = perf.fraction(r["tokens_per_s"], bound["bound_tokens_per_s"])
        except Exception as e:  # one variant failing must not lose the others
            log.exception("decode %s failed", name)
            r = {"error": f"{type(e).__name__}: {e}"}
        part["runs"][name] = r
        save()
        print(f"decode {name}: " + (f"{r['tokens_per_s']:.0f} tokens/s, {100 * r['fraction_of_bound']:.1f}% of the "
                                    f"{bound['bound_tokens_per_s']:.0f} tokens/s bound" if "error" not in r
                                    else r["error"]), flush=True)
    ours, lib = part["runs"].get("lean", {}), part["runs"].get("generate-static-compiled", {})
    if "tokens_per_s" in ours and "tokens_per_s" in lib:
        part["lean_over_generate"] = ours["tokens_per_s"] / lib["tokens_per_s"]
    del model
    _free(device)


# ---------------------------------------------------------------- loss pass

def synthetic_rollout(groups: int, n: int, prompt_len: int, completion_len: int, vocab: int, device):
    """A full-length rollout of random ids: ``groups`` prompts, ``n`` completions each, no padding."""
    import torch

    from mgrpo_cli.rollout.engine import Rollout

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (groups, prompt_len), generator=g).repeat_interleave(n, 0).to(device)
    completions = torch.randint(0, vocab, (groups * n, completion_len), generator=g).to(device)
    return Rollout(prompts, torch.ones_like(prompts), completions, torch.ones_like(completions), [""] * len(prompts), n)


def loss_pass(policy, reference, rollout, rows, chunked=None) -> None:
    """What one micro-batch of a training step computes: reference log-probs, policy log-probs, backward.
    ``chunked``: the log-prob path (None: completion_logps's default for the vocabulary)."""
    import torch

    from mgrpo_cli.algo.loss import completion_logps

    with torch.no_grad():
        ref = completion_logps(reference, rollout, rows, temperature=1.0, chunked=chunked)
    logps = completion_logps(policy, rollout, rows, temperature=1.0, chunked=chunked)
    mask = rollout.completion_mask[rows]
    ((logps - ref) * mask).sum().div(mask.sum()).backward()


def part_loss(a, shape: dict, device, dtype, hw: dict, result: dict, save) -> None:
    """The loss pass with gradient checkpointing (the 1.5B configs' default: the policy then runs one
    sequence per row) and without (each prompt once for its group), on the chunked or whole-logits path."""
    import perf  # scripts/perf.py, beside this script
    import torch

    from mgrpo_cli.algo.loss import CHUNKED_VOCAB

    policy = random_model(shape, device, dtype)
    policy.train()
    reference = random_model(shape, device, dtype)
    for p in reference.parameters():
        p.requires_grad_(False)
    ro = synthetic_rollout(a.loss_groups, a.n, a.prompt_len, a.loss_completion_len, shape["vocab_size"], device)
    rows = torch.arange(ro.completion_ids.shape[0], device=device)
    part = result["loss"] = {"groups": a.loss_groups, "n": a.n, "prompt_len": a.prompt_len,
                             "completion_len": a.loss_completion_len, "dtype": str(dtype).replace("torch.", ""),
                             "runs": {}}
    for variant in [v for v in a.loss_variants.split(",") if v]:
        checkpointing = variant.split("+")[0] == "ckpt"
        chunked = {"chunked": True, "whole": False}.get(variant.split("+")[1]) if "+" in variant else None
        if chunked is None:
            chunked = shape["vocab_size"] >= CHUNKED_VOCAB  # completion_logps's default for this plain head
        if checkpointing:
            policy.activation_checkpointing_enable()
        else:
            policy.activation_checkpointing_disable()
        flops = perf.loss_pass_flops(perf.ModelShape.from_config(shape), a.loss_groups, a.n, a.prompt_len,
                                     a.loss_completion_len, reference=True, policy_shared_prompts=not checkpointing)
        r = {"gradient_checkpointing": checkpointing, "chunked_logps": chunked, **flops}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            loss_pass(policy, reference, ro, rows, chunked)  # warm-up
            _sync(device)
            times = []
            for _ in range(a.loss_iters):
                policy.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss_pass(policy, reference, ro, rows, chunked)
                _sync(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            r.update(seconds=seconds, times=times, tokens_per_s=flops["tokens"] / seconds,
                     mfu=flops["flops"] / seconds / hw["peak_flops"],
                     peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
            print(f"loss pass {variant}: {seconds:.3f} s for {flops['tokens']} tokens, MFU {100 * r['mfu']:.1f}% of "
                  f"{hw['peak_flops'] / 1e12:.4g} TFLOP/s", flush=True)
        except Exception as e:
            log.exception("loss pass %s failed", variant)
            r["error"] = f"{type(e).__name__}: {e}"
        part["runs"][variant] = r
        policy.zero_grad(set_to_none=True)
        save()
    del policy, reference
    _free(device)


# ---------------------------------------------------------------- MGRPO steps

def compose_step_config(model: str, precision: str, a, workdir: Path, gpu: bool):
    """The train config of one steps run: ``model`` tiny (model=tiny) or 1.5b (random 1.5B shapes in
    ``workdir``), at ``precision``."""
    from hydra import compose, initialize_config_dir

    from mgrpo_cli.config.schema import conf_dir, register_configs

    tiny_model = model == "tiny"
    new_tokens = 32 if tiny_model else a.steps_1p5b_new_tokens
    overrides = ["layer=mgrpo", "dataset=arith", "logger=none", "warmup.enabled=false",
                 f"trainer={'gpu' if gpu else 'cpu'}", f"trainer.precision={precision}",
                 f"model.dtype={DTYPE_OF[precision]}", "grpo.prompts_per_step=8", "grpo.num_generations=8",
                 "layer.group_size=4", "grpo.beta=0.001", f"model.max_completion_length={new_tokens}",
                 "model.max_correction_length=null", f"paths.outputs={workdir / 'outputs'}"]
    if tiny_model:
        overrides += ["model=tiny", "grpo.lr=1e-4"]
    else:
        shape = TINY if a.tiny else QWEN25_1P5B
        (workdir / "config.json").write_text(json.dumps(shape))
        overrides += ["model=qwen1.5b", f"model.path={workdir}", f"model.random_init_layers={shape['num_hidden_layers']}",
                      "grpo.lr=5e-7", "grpo.micro_batch_tokens=16384"]
        if not gpu:
            overrides += ["model.attn_implementation=sdpa", "model.gradient_checkpointing=false"]
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_step_module(cfg, device):
    """(module, reward_fn, train dataloader) as ``mgrpo train`` builds them (through ``mgrpo_cli.cli.build``),
    on random weights: the tiny model without its warm start, or the random 1.5B shapes."""
    from mgrpo_cli.cli import build
    from mgrpo_cli.models.tiny import build_byte_tokenizer

    if cfg.model.path is not None:
        build_byte_tokenizer().save_pretrained(cfg.model.path)
    reward_fn = build.reward(cfg)
    with device:  # initialise the random weights on the device itself (fast on a GPU)
        policy, tok, _ = build.policy(cfg)
    module = build.module(cfg, policy, tok, reward_fn)  # a frozen KL reference when beta > 0
    return module, reward_fn, build.train_loader(build.problem_stream(cfg), module)


class TimedEngine:
    """Wraps the module's rollout engine: time inside ``generate`` and the tokens it produced."""

    def __init__(self, engine, device):
        self.engine, self.device = engine, device
        self.seconds, self.generated, self.through_loss = 0.0, 0, 0

    def generate(self, prompts, **kw):
        _sync(self.device)
        start = time.perf_counter()
        ro = self.engine.generate(prompts, **kw)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.generated += int(ro.completion_mask.sum())
        self.through_loss += int(ro.prompt_mask.sum() + ro.completion_mask.sum())
        return ro

    def __getattr__(self, name):
        return getattr(self.engine, name)


def time_steps(cfg, steps: int, device, cudnn_sdp: bool) -> dict:
    """``steps`` MGRPO steps under a Lightning Trainer; per-step seconds, rollout seconds and tokens."""
    import lightning as L
    import torch

    from mgrpo_cli.cli import build
    from mgrpo_cli.config import rules

    rules.check(cfg, "train")
    build.setup_runtime(cfg)  # what `mgrpo train` sets: threads, seeds, cuDNN attention off on CUDA
    if cudnn_sdp and device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(True)
    module, reward_fn, train_dl = build_step_module(cfg, device)
    timed = TimedEngine(module.engine, device)
    module.engine = timed
    per_step: list[dict] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            self.t0, self.r0 = time.perf_counter(), (timed.seconds, timed.generated, timed.through_loss)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            seconds = time.perf_counter() - self.t0
            rollout_s, gen, through = (x - y for x, y in zip((timed.seconds, timed.generated, timed.through_loss),
                                                             self.r0, strict=True))
            per_step.append({"seconds": seconds, "rollout_seconds": rollout_s, "generated_tokens": gen,
                             "loss_tokens": through})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision=cfg.trainer.precision, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[StepTimer()], default_root_dir=cfg.paths.outputs)
    try:
        trainer.fit(module, train_dataloaders=train_dl)
    finally:
        reward_fn.close()
        if device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)
    timed_steps = per_step[1:]
    rollout_s = sum(s["rollout_seconds"] for s in timed_steps)
    train_s = sum(s["seconds"] - s["rollout_seconds"] for s in timed_steps)
    out = {
        "parameters": sum(p.numel() for p in module.policy.parameters()),
        "median_step_s": statistics.median(s["seconds"] for s in timed_steps),
        "rollout_tokens_per_s": sum(s["generated_tokens"] for s in timed_steps) / max(rollout_s, 1e-9),
        "train_tokens_per_s": sum(s["loss_tokens"] for s in timed_steps) / max(train_s, 1e-9),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "per_step": per_step,
    }
    del module, trainer
    _free(device)
    return out


def part_steps(a, device, result: dict, save, clock: Clock) -> None:
    part = result["steps"] = {}
    for model in [m for m in a.steps_models.split(",") if m]:
        for variant in [v for v in (a.steps_precisions if model == "tiny" else a.steps_1p5b_precisions).split(",")
                        if v]:
            key = f"{model}/{variant}"
            if not clock.allows():
                part[key] = {"skipped": f"--budget-s {a.budget_s:.0f} reached"}
                continue
            precision, cudnn = variant.split("+")[0], variant.endswith("+cudnn")
            log.info("steps: %s", key)
            try:
                with tempfile.TemporaryDirectory(prefix="mgrpo_gpu_check_") as d:
                    cfg = compose_step_config(model, precision, a, Path(d), device.type == "cuda")
                    r = time_steps(cfg, a.steps if model == "tiny" else a.steps_1p5b_steps, device, cudnn)
                r.update(precision=precision, cudnn_sdp=cudnn)
                print(f"steps {key}: median {r['median_step_s']:.3f} s/step, rollout {r['rollout_tokens_per_s']:.0f} "
                      f"tokens/s, train {r['train_tokens_per_s']:.0f} tokens/s", flush=True)
            except Exception as e:
                log.exception("steps %s failed", key)
                r = {"error": f"{type(e).__name__}: {e}"}
            part[key] = r
            save()
    for model in [m for m in a.steps_models.split(",") if m]:  # bf16-true against fp32, the target
        fp32, bf16 = part.get(f"{model}/32-true", {}), part.get(f"{model}/bf16-true", {})
        if "median_step_s" in fp32 and "median_step_s" in bf16:
            part[f"{model}/bf16_true_over_fp32"] = bf16["median_step_s"] / fp32["median_step_s"]


# ---------------------------------------------------------------- driver

def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        env["sdp_backends"] = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
                               for name in ("flash", "mem_efficient", "math", "cudnn")}
    return env


def run(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    import torch

    clock = Clock(a.budget_s)
    gpu = torch.cuda.is_available() and not a.tiny
    if not gpu and not a.tiny:
        raise SystemExit("gpu_check: no CUDA device; use --tiny for the CPU smoke test")
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cuda.enable_cudnn_sdp(False)  # as `mgrpo train` runs (setup_runtime)
    else:
        torch.set_num_threads(1)
    shape = TINY if a.tiny else QWEN25_1P5B
    dtype = torch.bfloat16 if gpu else torch.float32
    hw = hardware(a, device)
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                    "environment": environment(), "hardware": {k: v for k, v in hw.items() if k != "_spec"},
                    "shape": shape}

    def save() -> None:
        result["elapsed_s"] = clock.elapsed()
        if a.json:
            a.json.write_text(json.dumps(result, indent=1, default=str))

    for name in a.parts:
        if not clock.allows():
            result[name] = {"skipped": f"--budget-s {a.budget_s:.0f} reached"}
            save()
            continue
        start = time.perf_counter()
        if name == "decode":
            part_decode(a, shape, device, dtype, hw, result, save, clock)
        elif name == "loss":
            part_loss(a, shape, device, dtype, hw, result, save)
        else:
            part_steps(a, device, result, save, clock)
        result.setdefault("part_seconds", {})[name] = time.perf_counter() - start
        save()
    runs = result.get("decode", {}).get("runs", {})
    pick = lambda r, k: f"{r[k]:.4g}" if isinstance(r, dict) and k in r else "NA"  # noqa: E731
    print(f"GPU_CHECK decode_tokens_per_s={pick(runs.get('lean'), 'tokens_per_s')} "
          f"decode_fraction_of_bound={pick(runs.get('lean'), 'fraction_of_bound')} "
          f"generate_tokens_per_s={pick(runs.get('generate-static-compiled'), 'tokens_per_s')} "
          f"loss_mfu={pick(result.get('loss', {}).get('runs', {}).get('ckpt'), 'mfu')} device={hw['device'].replace(' ', '_')} "
          f"elapsed_s={clock.elapsed():.0f} json={a.json}", flush=True)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run()
