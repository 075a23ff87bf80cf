"""Training-step speed: our GRPO / MGRPO step against TRL 1.16's GRPOTrainer on the same model folder.

Both sides do the same work per step: 8 prompts x 8 generations = 64 completions of at most N new
tokens (stopping at EOS), beta = 0.04 with a reference model, lr 1e-4, fp32; a run's step time is the
median of steps 3..S. TRL runs ``../shared/bench/trl_grpo_baseline.py`` (its defaults: gradient
checkpointing on, sdpa attention); ours runs ``MGRPOModule.training_step`` (rollout -> grade ->
advantages -> loss/backward -> optimizer step) under a plain Lightning Trainer, from the real conf/
composed with the same settings and ``model.attn_implementation=sdpa`` (the kernel TRL's loader picks,
and the tiny config's default). Our prompts are TRL's ``"{a}+{b}="`` through the plain template
(which adds a newline: one more prompt token). Every run is a fresh subprocess; the sides alternate
(TRL, ours, TRL, ours, ...) so that load from other work falls on both, and the result is the median
of the per-pair ratios.

Sizes: ``tiny`` is the 304k-parameter Qwen2 the baseline builds (N = 32, S = 20); ``mid`` the same
tokenizer with hidden 384, intermediate 1536, 6 layers, 6 heads, 2 kv heads (13.0M parameters,
N = 128, S = ``--mid-steps``, 6 by default so the whole run fits in ~15 minutes on 2 cores; pass
``--mid-steps 20`` for the full protocol, ~45 minutes more). Also measured: the MGRPO step over the
GRPO step at ``mgrpo train``'s own defaults (warm-started tiny model, arith task, G = 8, k = 2, H = 4,
beta = 0; ``--mgrpo-set KEY=VALUE`` changes them on both sides), alternating GRPO and MGRPO runs
of S steps, as step time and as tokens per second (prompt + completion tokens of every row through
sampling and through the loss passes, unpadded, counted per row as TRL's ``num_tokens`` and as
computed, each group's prompt once: the cost per token the second layer's longer prompts should not
raise); the peak RSS of the default ``mgrpo train trainer.max_steps=20``; our step time for G in {4, 8, 16} (N = 32) and
N in {32, 64, 128} (G = 8) with a least-squares line (slope, R^2), EOS switched off so that every
completion is exactly N tokens and N is the work done.

Accelerator: ``--accelerator cpu`` (the default) or ``gpu``: both sides on one GPU, still fp32 (TRL's
``bf16=False``, our ``trainer.precision=32-true``). The baseline script asks for ``use_cpu=True``;
on a GPU it runs unchanged except for that flag (``--trl-child`` wraps its ``GRPOConfig``).
The baseline is ``../shared/bench/trl_grpo_baseline.py`` unless ``--baseline PATH`` (or the variable
``MGRPO_TRL_BASELINE``) names another copy.

Threads: ``--threads 1`` (the default) runs both sides single-threaded. With torch's default (2
threads on 2 cores) any other busy process makes both sides 20-30x slower at random (OpenMP
barriers wait on a descheduled thread), which swamps the comparison; ``--threads 0`` keeps torch's
default on both sides for an idle machine.

    python benchmarks/step_speed.py [--pairs 3] [--sizes tiny,mid] [--mid-steps 6] [--threads 1]
    python benchmarks/step_speed.py --accelerator gpu --sizes mid --pairs 2 --skip mgrpo,rss,scan

The last line is ``STEP_SPEED ours/trl tiny=<ratio> mid=<ratio>``. Needs ``pip install -e .[bench]``
(trl 1.16). The models are built offline under ``--workdir`` (kept between runs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_ENV = "MGRPO_TRL_BASELINE"  # another copy of the baseline script (also --baseline)
BASELINE = Path(os.environ.get(BASELINE_ENV) or ROOT.parent / "shared" / "bench" / "trl_grpo_baseline.py")
PROMPTS_PER_STEP = 8
FIRST_TIMED_STEP = 3
# the attention kernel TRL's from_pretrained picks for this folder (also our tiny config's)
OURS_OVERRIDES = ["model.attn_implementation=sdpa"]
SIZES = {  # name -> (max new tokens, architecture overrides of the baseline's tiny Qwen2)
    "tiny": (32, {}),
    "mid": (128, {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                  "num_attention_heads": 6, "num_key_value_heads": 2}),
}


def _baseline():
    """The TRL baseline script as a module (its tiny-model builder and its prompts)."""
    spec = importlib.util.spec_from_file_location("trl_grpo_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(folder: Path, size: str) -> Path:
    """The baseline's tiny Qwen2 (char tokenizer, chat template), resized per ``SIZES``; built once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, GenerationConfig, Qwen2ForCausalLM

    _baseline().build_tiny_qwen2(str(folder))
    arch = SIZES[size][1]
    if arch:
        config = AutoConfig.from_pretrained(folder)
        for k, v in arch.items():
            setattr(config, k, v)
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig.from_pretrained(folder)
        model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------ our side (a child process)

def ours(args) -> None:
    """Time ``MGRPOModule.training_step`` for ``args.steps`` steps; last line ``OURS seconds_per_step=..``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from torch.utils.data import DataLoader

    from mgrpo_cli.cli import build
    from mgrpo_cli.config.schema import conf_dir, register_configs
    from mgrpo_cli.data.problems import Problem

    common = ["logger=none", f"layer={args.layer}", f"trainer.max_steps={args.steps}",
              f"trainer.accelerator={args.accelerator}", "trainer.precision=32-true",
              f"paths.outputs={tempfile.mkdtemp(prefix='step_speed_')}"]
    if args.threads:
        common.append(f"trainer.threads={args.threads}")
    if args.defaults:  # `mgrpo train`'s own setting: the warm-started tiny model on the arith task
        overrides = common + args.set
    else:  # TRL's protocol on its model folder
        overrides = common + [
            f"model.path={args.model_dir}", "model.dtype=float32", "model.prompt_template=plain",
            f"model.max_completion_length={args.max_new_tokens}", "warmup.enabled=false",
            f"grpo.num_generations={args.num_generations}", f"grpo.prompts_per_step={PROMPTS_PER_STEP}",
            "grpo.beta=0.04", "grpo.lr=1e-4", "grpo.temperature=1.0"] + OURS_OVERRIDES + args.set
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    build.setup_runtime(cfg)
    reward_fn = build.reward(cfg)
    policy, tok, _ = build.policy(cfg, build.warm_start(cfg, reward_fn))
    if args.no_eos:  # the scan: a new EOS token the 64-logit model can never emit -> every row runs N tokens
        tok.add_special_tokens({"eos_token": "<|never|>"})
    module = build.module(cfg, policy, tok, reward_fn)

    if args.defaults:
        stream = build.problem_stream(cfg)
        batches = [stream.batch(step) for step in range(args.steps)]
    else:
        data = _baseline().make_dataset(256)  # TRL's prompts "{a}+{b}=" and answers
        problems = [Problem(str(i), q, a) for i, (q, a) in enumerate(zip(data["prompt"], data["answer"], strict=True))]
        batches = [[problems[(s * PROMPTS_PER_STEP + j) % len(problems)] for j in range(PROMPTS_PER_STEP)]
                   for s in range(args.steps)]

    sync = torch.cuda.synchronize if args.accelerator != "cpu" and torch.cuda.is_available() else (lambda: None)

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.cpu, self.lengths, self.tokens, self.computed = [], [], [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            metrics = trainer.callback_metrics
            self.lengths.append(float(metrics["train/layer1/completion_length"]))
            # every layer's sampled and loss-pass tokens (prompt + completion per row, unpadded)
            self.tokens.append(sum(float(v) for k, v in metrics.items()
                                   if k.startswith("train/layer") and k.endswith(("/num_tokens", "/loss_tokens"))))
            # the same with each group's prompt counted once, as the step computes it
            self.computed.append(sum(float(v) for k, v in metrics.items() if k.startswith("train/layer")
                                     and k.endswith(("/num_tokens_computed", "/loss_tokens_computed"))))
            self.device = f"{pl_module.device}, {pl_module.policy.dtype}"  # fit's end moves the module back

    timer = StepTimer()
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        max_steps=args.steps, logger=False,
                        callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    reward_fn.close()
    median = statistics.median(timer.times[FIRST_TIMED_STEP - 1:])
    cpu = statistics.median(timer.cpu[FIRST_TIMED_STEP - 1:])
    timed = slice(FIRST_TIMED_STEP - 1, None)
    tokens_per_second = statistics.median(n / t for n, t in zip(timer.tokens[timed], timer.times[timed], strict=True))
    computed_per_second = statistics.median(n / t for n, t in zip(timer.computed[timed], timer.times[timed], strict=True))
    print(f"[ours] per-step seconds: {' '.join(f'{t:.3f}' for t in timer.times)}")
    print(f"[ours] completion length per step: {' '.join(f'{x:.1f}' for x in timer.lengths)}")
    print(f"[ours] device {timer.device}")
    sys.stdout.flush()
    print(f"OURS seconds_per_step={median:.4f} cpu_seconds_per_step={cpu:.4f} "
          f"mean_completion_length={statistics.mean(timer.lengths):.2f} tokens_per_second={tokens_per_second:.1f} "
          f"tokens_per_step={statistics.median(timer.tokens[timed]):.0f} "
          f"computed_tokens_per_second={computed_per_second:.1f} "
          f"computed_tokens_per_step={statistics.median(timer.computed[timed]):.0f}")


def trl_child(accelerator: str, argv: list[str]) -> None:
    """Run the baseline script as it is, with ``argv``; on an accelerator its ``GRPOConfig(use_cpu=True)``
    becomes ``use_cpu=False`` (transformers then places the policy and the reference on the GPU)."""
    import runpy

    import trl

    if accelerator != "cpu":
        class OnAccelerator(trl.GRPOConfig):
            def __post_init__(self):
                self.use_cpu = False
                super().__post_init__()
                print(f"[trl] GRPOConfig use_cpu=False: device {self.device}", flush=True)

        trl.GRPOConfig = OnAccelerator
    sys.argv = [str(BASELINE), *argv]
    runpy.run_path(str(BASELINE), run_name="__main__")


# ------------------------------------------------------------------------ the driver

def _last_value(stdout: str, prefix: str) -> dict[str, float]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"no line starting with {prefix!r} in:\n{stdout[-3000:]}")
    return {k: float(v) for k, v in (kv.split("=") for kv in lines[-1].split()[1:])}


def _child(cmd: list[str], prefix: str) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():  # where a run on an accelerator really ran
        if line.startswith(("[trl] GRPOConfig", "[ours] device")) and "device cpu" not in line:
            print(f"  {line}", flush=True)
    return _last_value(proc.stdout, prefix)


def run_trl(model_dir: Path, max_new: int, steps: int, threads: int, accelerator: str = "cpu") -> float:
    args = ["--model-dir", str(model_dir), "--skip-gen-bench", "--max-completion-length", str(max_new),
            "--max-steps", str(steps)]
    if threads:
        args += ["--threads", str(threads)]
    if accelerator == "cpu":
        cmd = [sys.executable, str(BASELINE), *args]
    else:
        cmd = [sys.executable, __file__, "--trl-child", "--accelerator", accelerator, "--", *args]
    return _child(cmd, "TRL_GRPO")["seconds_per_step"]


def run_ours(model_dir: Path, max_new: int, steps: int, threads: int, layer: str = "grpo",
             num_generations: int = 8, no_eos: bool = False, accelerator: str = "cpu") -> dict[str, float]:
    cmd = [sys.executable, __file__, "--ours", "--model-dir", str(model_dir), "--max-new-tokens", str(max_new),
           "--steps", str(steps), "--threads", str(threads), "--layer", layer,
           "--num-generations", str(num_generations), "--accelerator", accelerator] + (["--no-eos"] if no_eos else [])
    return _child(cmd, "OURS")


def compare(size: str, model_dir: Path, pairs: int, steps: int, threads: int, accelerator: str = "cpu") -> dict:
    """Alternate TRL and ours ``pairs`` times; per-pair ratios and their medians."""
    max_new = SIZES[size][0]
    rows = []
    for i in range(pairs):
        row = {"trl": run_trl(model_dir, max_new, steps, threads, accelerator)}
        o = run_ours(model_dir, max_new, steps, threads, accelerator=accelerator)
        row["ours"], row["ours_len"] = o["seconds_per_step"], o["mean_completion_length"]
        print(f"[{size}] pair {i + 1}/{pairs}: TRL {row['trl']:.3f} s  ours GRPO {row['ours']:.3f} s"
              + f"  ours/TRL {row['ours'] / row['trl']:.3f}", flush=True)
        rows.append(row)
    out = {"rows": rows, "ratio": statistics.median(r["ours"] / r["trl"] for r in rows),
           "trl": statistics.median(r["trl"] for r in rows), "ours": statistics.median(r["ours"] for r in rows)}
    return out


def mgrpo_vs_grpo(pairs: int, steps: int, threads: int, overrides: list[str], accelerator: str = "cpu") -> dict:
    """``mgrpo train``'s own step (warm-started tiny model, arith task, all defaults but ``overrides``)
    with layer=grpo and layer=mgrpo, alternating ``pairs`` times: the medians of the per-pair ratios
    MGRPO / GRPO of the step time and of the tokens per second."""
    rows = []
    for i in range(pairs):
        cmd = [sys.executable, __file__, "--ours", "--defaults", "--steps", str(steps), "--threads", str(threads),
               "--accelerator", accelerator]
        cmd += [f"--set={o}" for o in overrides]
        row = {}
        for layer in ("grpo", "mgrpo"):
            out = _child(cmd + ["--layer", layer], "OURS")
            row[layer], row[f"{layer}_tps"] = out["seconds_per_step"], out["tokens_per_second"]
            row[f"{layer}_tokens"], row[f"{layer}_ctps"] = out["tokens_per_step"], out["computed_tokens_per_second"]
            row[f"{layer}_ctokens"] = out["computed_tokens_per_step"]
        print(f"[defaults] pair {i + 1}/{pairs}: GRPO {row['grpo']:.3f} s ({row['grpo_tps']:.0f} tok/s, "
              f"{row['grpo_ctps']:.0f} computed)  MGRPO {row['mgrpo']:.3f} s ({row['mgrpo_tps']:.0f} tok/s, "
              f"{row['mgrpo_ctps']:.0f} computed)  MGRPO/GRPO time {row['mgrpo'] / row['grpo']:.3f}, tokens/s "
              f"{row['mgrpo_tps'] / row['grpo_tps']:.3f}, computed {row['mgrpo_ctps'] / row['grpo_ctps']:.3f}", flush=True)
        rows.append(row)
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"rows": rows, "steps": steps, "overrides": overrides,
            "ratio": statistics.median(r["mgrpo"] / r["grpo"] for r in rows), "grpo": med("grpo"), "mgrpo": med("mgrpo"),
            "tps_ratio": statistics.median(r["mgrpo_tps"] / r["grpo_tps"] for r in rows),
            "grpo_tps": med("grpo_tps"), "mgrpo_tps": med("mgrpo_tps"),
            "grpo_tokens": med("grpo_tokens"), "mgrpo_tokens": med("mgrpo_tokens"),
            "ctps_ratio": statistics.median(r["mgrpo_ctps"] / r["grpo_ctps"] for r in rows),
            "grpo_ctps": med("grpo_ctps"), "mgrpo_ctps": med("mgrpo_ctps"),
            "grpo_ctokens": med("grpo_ctokens"), "mgrpo_ctokens": med("mgrpo_ctokens")}


def _warm_start_note(outputs: str) -> tuple[list[str], str]:
    """Extra overrides and a note for the RSS run: the default tiny model needs its warm start.

    A shipped warm start (``mgrpo_cli/warmstart/<key>``) is used as is; one cached under this clone's
    ``outputs/warmstart/<key>`` is copied in; with neither, the warm-up runs, shortened to 20 steps
    (it trains the 0.5M-parameter model on batches of 128 examples: its memory does not grow with steps).
    """
    import shutil

    from hydra import compose, initialize_config_dir

    from mgrpo_cli.cli.build import warmup_spec
    from mgrpo_cli.config.schema import conf_dir, register_configs
    from mgrpo_cli.training.warmup import SHIPPED, cache_key

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        key = cache_key(warmup_spec(compose(config_name="train", overrides=[f"paths.outputs={outputs}"])))
    if (SHIPPED / key / "warmup.json").is_file():
        return [], f"shipped warm start {key}"
    cached = ROOT / "outputs" / "warmstart" / key
    if (cached / "warmup.json").is_file():
        shutil.copytree(cached, Path(outputs) / "warmstart" / key)
        return [], f"cached warm start {key} copied in"
    return ["warmup.steps=20"], "no cached warm start: warm-up run, shortened to 20 steps"


def peak_rss_default_train(steps: int, threads: int, accelerator: str = "cpu") -> tuple[float, float, str]:
    """(GiB, seconds, note) of ``mgrpo train trainer.max_steps=<steps>`` in a fresh outputs folder.

    Run under a fresh ``--rss-child`` process so that ``RUSAGE_CHILDREN`` sees only this run (the peak
    of its largest process: the trainer, or the grader's worker)."""
    outputs = tempfile.mkdtemp(prefix="step_speed_rss_")
    extra, note = _warm_start_note(outputs)
    exe = Path(sys.executable).parent / "mgrpo"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mgrpo_cli"]
    cmd += ["train", f"trainer.max_steps={steps}", f"paths.outputs={outputs}", *extra]
    if accelerator != "cpu":
        cmd.append(f"trainer.accelerator={accelerator}")
    if threads:
        cmd.append(f"trainer.threads={threads}")
    start = time.perf_counter()
    kib = _child([sys.executable, __file__, "--rss-child", "--", *cmd], "RSS")["max_kib"]
    return kib / 2**20, time.perf_counter() - start, note


def rss_child(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, COLUMNS="120"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    print(f"RSS max_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R^2)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def scan(model_dir: Path, steps: int, threads: int, accelerator: str = "cpu") -> dict:
    """Our GRPO step for G in {4, 8, 16} (N = 32) and N in {32, 64, 128} (G = 8), EOS off.

    The lines are fitted to the step's CPU seconds (= its work, single-threaded), which other load on
    the machine disturbs far less than wall time; both are printed."""
    times, cpu = {}, {}
    for g, n in [(4, 32), (8, 32), (16, 32), (8, 64), (8, 128)]:
        o = run_ours(model_dir, n, steps, threads, num_generations=g, no_eos=True, accelerator=accelerator)
        times[(g, n)], cpu[(g, n)] = o["seconds_per_step"], o["cpu_seconds_per_step"]
        print(f"[scan] G={g:<3d} N={n:<4d} {times[(g, n)]:.3f} s/step (cpu {cpu[(g, n)]:.3f} s)", flush=True)
    gs, ns = [4, 8, 16], [32, 64, 128]
    return {"times": times, "cpu": cpu, "fit_g": linear_fit(gs, [cpu[(g, 32)] for g in gs]),
            "fit_n": linear_fit(ns, [cpu[(8, n)] for n in ns])}


def main() -> int:
    global BASELINE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mgrpo_step_speed"))
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="steps per run (median of steps 3..steps)")
    ap.add_argument("--mid-steps", type=int, default=6, help="steps per run at the mid size (20 = the full protocol)")
    ap.add_argument("--scan-steps", type=int, default=8)
    ap.add_argument("--rss-steps", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: compare,mgrpo,rss,scan")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides; 0 = torch's default")
    ap.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                    help="where both sides run (gpu: one GPU, fp32 on both sides)")
    ap.add_argument("--baseline", default=None, metavar="PATH",
                    help=f"the TRL baseline script (default {BASELINE}; also the variable {BASELINE_ENV})")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--mgrpo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both sides of the MGRPO/GRPO part (repeatable), "
                         "e.g. model.max_completion_length=48 for equal layer budgets")
    # the child mode (one timed run of ours)
    ap.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--max-new-tokens", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--layer", default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--num-generations", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--no-eos", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--defaults", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:  # children (ours reads the baseline's prompts) find it through the variable
        BASELINE = Path(args.baseline).resolve()
        os.environ[BASELINE_ENV] = str(BASELINE)
    if args.trl_child:
        trl_child(args.accelerator, args.command)
        return 0
    if args.ours:
        ours(args)
        return 0
    if args.rss_child:
        rss_child(args.command)
        return 0

    if not BASELINE.is_file():
        raise SystemExit(f"step_speed: no TRL baseline script at {BASELINE} (--baseline PATH or {BASELINE_ENV})")
    work = Path(args.workdir)
    skip = set(filter(None, args.skip.split(",")))
    sizes = [s for s in args.sizes.split(",") if s]
    models = {s: build_model(work / s, s) for s in {*sizes, "tiny"}}
    result: dict = {"threads": args.threads, "pairs": args.pairs, "accelerator": args.accelerator}
    t_start = time.perf_counter()
    if "compare" not in skip:
        for size in sizes:
            steps = args.mid_steps if size == "mid" and args.mid_steps else args.steps
            result[size] = compare(size, models[size], args.pairs, steps, args.threads, args.accelerator)
            result[size]["steps"] = steps
    if "mgrpo" not in skip:
        result["mgrpo"] = mgrpo_vs_grpo(args.pairs, args.steps, args.threads, args.mgrpo_set, args.accelerator)
    if "rss" not in skip:
        gib, secs, note = peak_rss_default_train(args.rss_steps, args.threads, args.accelerator)
        result["rss_gib"], result["rss_s"], result["rss_note"] = gib, secs, note
        print(f"[rss] mgrpo train trainer.max_steps={args.rss_steps}: peak RSS {gib:.2f} GiB ({secs:.0f} s; {note})",
              flush=True)
    if "scan" not in skip:
        result["scan"] = scan(models["tiny"], args.scan_steps, args.threads, args.accelerator)
    result["seconds"] = time.perf_counter() - t_start
    print(report(result))
    if args.json_out:
        plain = {**result}
        if "scan" in plain:  # (G, N) keys -> "G=..,N=.."
            plain["scan"] = {k: {f"G={g},N={n}": t for (g, n), t in v.items()} if isinstance(v, dict) else v
                             for k, v in plain["scan"].items()}
        with open(args.json_out, "w") as f:
            json.dump(plain, f, indent=1)
    ratios = " ".join(f"{s}={result[s]['ratio']:.3f}" for s in sizes if s in result)
    print(f"STEP_SPEED ours/trl {ratios}")
    return 0


def report(r: dict) -> str:
    """The markdown table for docs/benchmarks.md."""
    lines = ["", "| size | new tokens | TRL s/step | ours GRPO s/step | ours/TRL (median of pairs) | pairs |",
             "|---|---|---|---|---|---|"]
    for size in SIZES:
        if size in r:
            x = r[size]
            per = ", ".join(f"{row['ours'] / row['trl']:.2f}" for row in x["rows"])
            lines.append(f"| {size} | {SIZES[size][0]} | {x['trl']:.3f} | {x['ours']:.3f} | **{x['ratio']:.2f}** ({per}) "
                         f"| {len(x['rows'])} x {x['steps']} steps |")
    if "mgrpo" in r:
        x = r["mgrpo"]
        per = ", ".join(f"{row['mgrpo'] / row['grpo']:.2f}" for row in x["rows"])
        at = " ".join(x["overrides"]) or "no overrides"
        lines.append(f"\nMGRPO step / GRPO step at the `mgrpo train` defaults (G=8, k=2, H=4; {at}): **{x['ratio']:.2f}** "
                     f"({x['mgrpo']:.3f} s vs {x['grpo']:.3f} s; pairs: {per})")
        if "tps_ratio" in x:
            per = ", ".join(f"{row['mgrpo_tps'] / row['grpo_tps']:.2f}" for row in x["rows"])
            lines.append(f"\nMGRPO tokens/s / GRPO tokens/s (prompt + completion tokens of every row through sampling "
                         f"and the loss passes, TRL's count): **{x['tps_ratio']:.2f}** ({x['mgrpo_tps']:.0f} vs "
                         f"{x['grpo_tps']:.0f} tokens/s; {x['mgrpo_tokens']:.0f} vs {x['grpo_tokens']:.0f} tokens per "
                         f"step; pairs: {per})")
            per = ", ".join(f"{row['mgrpo_ctps'] / row['grpo_ctps']:.2f}" for row in x["rows"])
            lines.append(f"\nThe same counting each group's prompt once, as the step computes it: **{x['ctps_ratio']:.2f}** "
                         f"({x['mgrpo_ctps']:.0f} vs {x['grpo_ctps']:.0f} tokens/s; {x['mgrpo_ctokens']:.0f} vs "
                         f"{x['grpo_ctokens']:.0f} tokens per step; pairs: {per})")
    if "rss_gib" in r:
        lines.append(f"\nPeak RSS of the default `mgrpo train trainer.max_steps=20`: **{r['rss_gib']:.2f} GiB** "
                     f"({r['rss_note']}; {r['rss_s']:.0f} s)")
    if "scan" in r:
        s = r["scan"]
        lines.append("\n| G | N | s/step (wall) | CPU s/step |\n|---|---|---|---|")
        lines += [f"| {g} | {n} | {t:.3f} | {s['cpu'][(g, n)]:.3f} |" for (g, n), t in s["times"].items()]
        for name, (a, b, r2) in (("G", s["fit_g"]), ("N", s["fit_n"])):
            lines.append(f"\nlinear fit over {name}: CPU s/step = {a:.3f} + {b:.4f} x {name}, R^2 = {r2:.3f}")
    lines.append(f"\n(benchmark wall time {r['seconds'] / 60:.1f} min, torch threads: "
                 f"{r['threads'] or 'default'}, accelerator: {r.get('accelerator', 'cpu')})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
