"""The build layer: the only code below the commands that reads the whole config.

The rules come first (``config.rules.check``, before any model loads); the functions here turn the
config into the plain objects the rest of the code takes: the reward function (with the grader), the policy and
tokenizer (the tiny model's warm start is its own explicit step, :func:`warm_start`), the prompt
renderer, the rollout engine and how it samples, the advantage estimator, the policy loss and the
:class:`~mgrpo_cli.algo.loss.LossSpec` of the loss passes, the entropy controller, one
:class:`~mgrpo_cli.algo.layers.LayerSpec` per depth, the :class:`~mgrpo_cli.algo.solve.SolveSpec` of validation
and eval, the problem stream, the Lightning module, the strategy and the Trainer.

``mgrpo train`` and ``mgrpo eval`` (and the benchmarks, scripts and tests) call these; below them
nothing sees ``cfg``.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from mgrpo_cli.config.rules import checkpoint_config, is_embedded
from mgrpo_cli.errors import UserError, bad_value

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- run set-up

def setup_runtime(cfg: Any) -> None:
    """Threads, seeds, quiet library loggers; on CUDA, cuDNN attention off (see below)."""
    import lightning as L
    import torch

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if torch.cuda.is_available():
        # torch's first choice for bf16 attention on Hopper is cuDNN, which builds a plan for every new
        # shape, and rollouts and loss passes bring new shapes all the time
        torch.backends.cuda.enable_cudnn_sdp(False)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "httpx", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file bars of save/load; our own bars show long work
    # Lightning 2.6's CombinedLoader builds torch pytree LeafSpecs, which torch 2.13 deprecates: a
    # library pairing we cannot change from here, raised once per fit/validate
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_dir(cfg: Any) -> Path:
    """Hydra's output folder for this job, or a fresh one under paths.outputs outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.paths.outputs) / cfg.task_name / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def config_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def run_logger(cfg: Any, run_name: str, run_folder: Path, run_id: Optional[str] = None):
    """The MLflow run of this command (``logger.enabled``), or None; ``run_id`` reopens a run (resume=).
    What it logs waits in ``run_folder``'s outbox until the store has it (``reporting.outbox``); a
    store that does not answer at the start is one line naming ``logger.tracking_uri``.
    Tagged with the run folder (``run_dir``, how ``mgrpo report`` finds a folder's run) and, in a
    sweep, with the sweep's parent run (``mlflow.parentRunId`` from ``sweep.PARENT_ENV``), which nests
    it under that run."""
    if not cfg.logger.enabled:
        return None
    from mgrpo_cli.reporting.sweep import PARENT_ENV
    from mgrpo_cli.reporting.tracking import RunLogger, TrackingUnavailable, default_tracking_uri

    uri = cfg.logger.tracking_uri or default_tracking_uri(cfg.paths.outputs)
    tags = {"overrides": " ".join(overrides()) or "(none)", "task": cfg.task_name,
            "run_dir": str(Path(run_folder).resolve())}
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    try:
        return RunLogger(uri, cfg.logger.experiment, run_name, params=config_dict(cfg), folder=run_folder,
                         artifacts=Path(cfg.paths.outputs).resolve() / "mlartifacts", tags=tags, run_id=run_id)
    except TrackingUnavailable as e:
        raise bad_value("logger.tracking_uri", uri, f"the tracking store does not work: {e}; start it or fix the "
                                                    f"address, or train without tracking: logger=none") from None


# ---------------------------------------------------------------------------------------------- objects

def reward(cfg: Any):
    """The reward function of ``cfg.reward``, with its own grader (shared by training and eval)."""
    from mgrpo_cli.grading.grader import Grader
    from mgrpo_cli.grading.rewards import RewardFunction

    r = cfg.reward
    return RewardFunction([(t.name, t.weight) for t in r.terms],
                          Grader(timeout_s=r.timeout_s, last_number_fallback=r.last_number_fallback),
                          format_style=str(r.format_style), random_probability=r.random_probability)


def correction_budget(cfg: Any, first_budget: Optional[int] = None) -> int:
    """New-token budget of a correction (layers 2+, t2): ``layer.max_new_tokens``, else
    ``model.max_correction_length``, else the first answer's budget."""
    return (cfg.layer.max_new_tokens or cfg.model.max_correction_length
            or first_budget or cfg.model.max_completion_length)


def warmup_spec(cfg: Any):
    from mgrpo_cli.config.schema import ArithConfig
    from mgrpo_cli.training.warmup import WarmupSpec

    w = cfg.warmup
    arith = OmegaConf.structured(ArithConfig) if w.task == "default" else cfg.dataset.arith
    return WarmupSpec(model=model_spec(cfg.model), max_prompt_length=cfg.model.max_prompt_length, arith=OmegaConf.to_container(arith, enum_to_str=True),
                      steps=w.steps, batch_size=w.batch_size, lr=w.lr, eval_every=w.eval_every,
                      target_accuracy=w.target_accuracy, correction_share=w.correction_share,
                      cache_dir=str(w.cache_dir), phrases=tuple(cfg.layer.phrases),
                      phrase_template=cfg.layer.phrase_template, max_new_tokens=correction_budget(cfg), seed=w.seed)


def warm_start(cfg: Any, reward_fn, should_stop: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """The embedded tiny model's warm start (a folder; trained first if not cached), or None when the
    policy is a configured model or ``warmup.enabled=false``. ``should_stop`` ends a warm-up in
    progress (``warmup.WarmupStopped``)."""
    if not (is_embedded(cfg) and cfg.warmup.enabled):
        return None
    from mgrpo_cli.training.warmup import warm_start as make_warm_start

    return str(make_warm_start(warmup_spec(cfg), reward_fn.grader.correct, should_stop or (lambda: False)))


def model_spec(m: Any):
    """The ``model`` section as the plain ``models.ModelSpec`` that loads or builds the policy."""
    from mgrpo_cli.models.loading import ModelSpec

    return ModelSpec(name=m.name, path=m.path, dtype=str(m.dtype), attn_implementation=m.attn_implementation,
                     gradient_checkpointing=m.gradient_checkpointing, trust_remote_code=m.trust_remote_code,
                     random_init_layers=m.random_init_layers, hidden_size=m.hidden_size,
                     intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                     num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads)


def lora_spec(lo: Any):
    """The ``lora`` section as the plain ``models.LoraSpec``."""
    from mgrpo_cli.models.loading import LoraSpec

    return LoraSpec(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=tuple(lo.target_modules),
                    export=str(lo.export))


def policy(cfg: Any, path: Optional[str] = None, *, lora: bool = True):
    """(policy, tokenizer, source): ``path`` (a warm start or export folder), else ``model.path``, else
    the randomly initialised tiny model; LoRA applied when ``lora.enabled``."""
    from mgrpo_cli.models.loading import apply_lora, cast_lm_head_to_fp32, disable_dropout, load_policy

    path = path or cfg.model.path
    try:
        model, tok = load_policy(model_spec(cfg.model), cfg.trainer.accelerator, cfg.seed, path=path)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise bad_value("model.path", path, f"could not be loaded: {first}") from None
    if cfg.grpo.cast_lm_head_to_fp32:
        cast_lm_head_to_fp32(model)
    if cfg.lora.enabled:
        model = apply_lora(model, lora_spec(cfg.lora))
    if cfg.grpo.disable_dropout:
        disable_dropout(model)
    return model, tok, path or "tiny (random init)"


def correction_prompt_length(cfg: Any, model) -> Optional[int]:
    """``model.max_correction_prompt_length``, else the model's ``max_position_embeddings`` minus the
    correction budget (None for a model without one)."""
    from mgrpo_cli.models.loading import base_model

    m = cfg.model
    if m.max_correction_prompt_length is not None:
        return m.max_correction_prompt_length
    positions = getattr(base_model(model).config, "max_position_embeddings", None)
    if positions is None:
        return None
    budget = positions - correction_budget(cfg)
    if budget <= m.max_prompt_length:
        raise bad_value("model.max_correction_prompt_length", None, f"the model's {positions} positions minus the "
                        f"correction budget ({correction_budget(cfg)}) leave {budget} tokens, no more than "
                        f"model.max_prompt_length={m.max_prompt_length}: lower the budgets")
    return budget


def renderer(cfg: Any, tokenizer, model):
    """The prompts of every layer, within ``model.max_prompt_length`` and :func:`correction_prompt_length`."""
    from mgrpo_cli.rollout.prompts import PromptRenderer

    if cfg.model.prompt_template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise bad_value("model.prompt_template", "chat", "the tokenizer has no chat template; use plain")
    lay = cfg.layer
    return PromptRenderer(tokenizer, cfg.model.prompt_template, cfg.system_prompt, lay.input_mode,
                          lay.phrase_template, lay.new_turn_prompt, cfg.model.max_prompt_length,
                          correction_prompt_length(cfg, model))


def engine(cfg: Any, model, tokenizer):
    """The rollout engine; its rows stop on every token that ends the model's turn (``stop_token_ids``),
    and with ``model.rollout_dtype`` it samples in that precision."""
    import torch

    from mgrpo_cli.models.loading import base_model
    from mgrpo_cli.rollout.engine import HFEngine, stop_token_ids

    generation = getattr(base_model(model), "generation_config", None)
    stops = stop_token_ids(tokenizer, getattr(generation, "eos_token_id", None),
                           chat=cfg.model.prompt_template == "chat")
    # prompts come fitted to their budgets (renderer); the engine's own cut is a guard at the larger one
    longest = max(cfg.model.max_prompt_length, correction_prompt_length(cfg, model) or 0)
    dtype = cfg.model.rollout_dtype
    return HFEngine(model, tokenizer, max_prompt_length=longest, seed=cfg.seed, stop_ids=stops,
                    rollout_dtype=None if dtype is None else getattr(torch, str(dtype)))


def sampling(cfg: Any):
    """How training rollouts sample (``rollout.engine.Sampling``), for the layer pipeline."""
    from mgrpo_cli.rollout.engine import Sampling

    g = cfg.grpo
    return Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                    repetition_penalty=g.repetition_penalty)


def advantages(cfg: Any):
    """The advantage estimator (``algo.advantage.Advantages``), for the layer pipeline."""
    from mgrpo_cli.algo.advantage import advantage_fn

    g = cfg.grpo
    return advantage_fn(str(g.adv_estimator), str(g.scale_rewards), g.std_eps,
                        str(cfg.reward.multi_objective_aggregation))


def policy_loss(cfg: Any):
    """The per-token policy loss of ``grpo.loss_type`` (``algo.grpo.PolicyLoss``), with the settings
    its registry entry names (``grpo.LOSS_TYPES[...].settings``, read by their ``grpo.*`` keys)."""
    from mgrpo_cli.algo import grpo

    g = cfg.grpo
    kind = str(g.loss_type)
    return grpo.policy_loss(str(g.importance_sampling_level), g.epsilon, g.epsilon_high, g.delta, g.beta, kind,
                            off_policy_threshold=g.off_policy_mask_threshold,
                            bias_correction_kl=g.use_bias_correction_kl,
                            **{name: g[name] for name in grpo.LOSS_TYPES[kind].settings})


def loss_spec(cfg: Any):
    """What the loss passes take (``algo.loss.LossSpec``)."""
    from mgrpo_cli.algo.loss import LossSpec

    g = cfg.grpo
    return LossSpec(policy=policy_loss(cfg), temperature=g.temperature, micro_batch_tokens=g.micro_batch_tokens,
                    max_completion_length=cfg.model.max_completion_length, num_iterations=g.num_iterations,
                    mask_truncated_completions=g.mask_truncated_completions,
                    top_entropy_quantile=g.top_entropy_quantile,
                    entropy_bonus=g.entropy_coef != 0 or g.use_adaptive_entropy,
                    rollout_is=None if g.rollout_is is None else str(g.rollout_is), rollout_is_cap=g.rollout_is_cap)


def entropy_control(cfg: Any):
    """The entropy bonus's coefficient per layer (``training.controllers.EntropyControl``)."""
    from mgrpo_cli.training.controllers import EntropyControl

    g = cfg.grpo
    return EntropyControl(range(1, cfg.layer.depth + 1), g.entropy_coef, g.use_adaptive_entropy,
                          g.entropy_target if g.entropy_target is not None else 0.0, g.entropy_coef_delta,
                          g.entropy_coef_min, g.entropy_coef_max)


def layer_specs(cfg: Any) -> list:
    """One LayerSpec per depth: layer 1 answers the questions (G samples, the answer budget); layers
    2..depth correct the layer before (H samples, the correction budget, the layer.* choices)."""
    from mgrpo_cli.algo.layers import LayerSpec

    lay, g = cfg.layer, cfg.grpo
    phrases = tuple(lay.phrases)
    specs = []
    for depth in range(1, lay.depth + 1):
        last = depth == lay.depth
        common = dict(depth=depth, select=None if last else str(lay.select), k=lay.k, phrases=phrases,
                      dynamic_sampling=g.dynamic_sampling, max_sampling_rounds=g.max_sampling_rounds,
                      overlong_buffer_len=cfg.reward.overlong_buffer_len,
                      overlong_penalty_factor=cfg.reward.overlong_penalty_factor)
        if depth == 1:
            # the questions' layer: the plain reward, full weight, every completion in the loss
            specs.append(LayerSpec(n=cfg.grpo.num_generations, max_new_tokens=cfg.model.max_completion_length,
                                   reward="correct", improvement_bonus=0.0, weight=1.0, keep_successful=False,
                                   **common))
        else:
            specs.append(LayerSpec(n=lay.group_size, max_new_tokens=correction_budget(cfg), reward=str(lay.reward),
                                   improvement_bonus=lay.improvement_bonus, weight=lay.weight,
                                   keep_successful=lay.keep == "successful", **common))
    return specs


def solve_spec(cfg: Any, *, command: str = "train"):
    """How held-out problems are answered (``eval.n`` samples at ``eval.temperature``, greedy by
    default): validation during training, or ``mgrpo eval`` (whose ``eval.max_new_tokens`` may set the budget)."""
    from mgrpo_cli.algo.solve import SolveSpec

    ev = cfg.eval
    first = (ev.max_new_tokens if command == "eval" else None) or cfg.model.max_completion_length
    phrase = cfg.layer.eval_phrase if ev.two_pass else None
    second = correction_budget(cfg, first) if command == "eval" else correction_budget(cfg)
    return SolveSpec(first, second, ev.batch_size, ev.n, ev.temperature, phrase)


def dataset_spec(d: Any):
    """The ``dataset`` section (a node, or a ``DatasetConfig``) as the plain ``loaders.DatasetSpec``."""
    import dataclasses

    from mgrpo_cli.data.loaders import DatasetSpec

    if dataclasses.is_dataclass(d):
        d = OmegaConf.structured(d)
    plain = OmegaConf.to_container(d, resolve=True, enum_to_str=True)
    return DatasetSpec(**{f.name: plain[f.name] for f in dataclasses.fields(DatasetSpec)})


def problem_stream(cfg: Any):
    """Training problems by step (``data.ProblemStream``): arith draws fresh ones, other data sets a pool."""
    from mgrpo_cli.data.loaders import load_problems
    from mgrpo_cli.data.problems import ArithTask, ProblemStream

    size = cfg.grpo.prompts_per_step
    if cfg.dataset.kind == "arith":
        return ProblemStream(size, cfg.seed, arith=ArithTask(**cfg.dataset.arith))
    loaded = load_problems(dataset_spec(cfg.dataset), "train", data_dir=cfg.paths.data)
    if loaded.skipped:
        log.warning("skipped %d malformed training rows of %s", loaded.skipped, loaded.source)
    return ProblemStream(size, cfg.seed, pool=loaded.problems)


def held_out(cfg: Any, seed: int = 0):
    """The held-out problems (``eval.split``; ``eval.limit`` of them, a seeded sample), as ``loaders.Loaded``."""
    from mgrpo_cli.data.loaders import load_problems

    ev = cfg.eval
    loaded = load_problems(dataset_spec(cfg.dataset), ev.split, limit=ev.limit, seed=None if ev.limit is None else seed,
                           data_dir=cfg.paths.data)
    if loaded.skipped:
        log.warning("skipped %d malformed held-out rows of %s", loaded.skipped, loaded.source)
    return loaded


def module(cfg: Any, policy_model, tokenizer, reward_fn, stream=None):
    """The Lightning module, with the KL reference when ``grpo.beta`` > 0; with ``grpo.dynamic_sampling``
    layer 1 refills from ``stream`` (the training problem stream; made here when not given)."""
    import torch

    from mgrpo_cli.models.loading import reference_policy
    from mgrpo_cli.training.controllers import ReferenceSync, Refill
    from mgrpo_cli.training.module import MGRPOModule, OptimSpec

    g = cfg.grpo
    bf16_mixed = str(cfg.trainer.precision).startswith("bf16-mixed")
    reference = reference_policy(policy_model, g.beta)
    return MGRPOModule(
        policy_model, tokenizer, engine=engine(cfg, policy_model, tokenizer),
        renderer=renderer(cfg, tokenizer, policy_model), reward_fn=reward_fn, grader=reward_fn.grader,
        layers=layer_specs(cfg), sampling=sampling(cfg), advantages=advantages(cfg), loss=loss_spec(cfg),
        optim=OptimSpec(lr=g.lr, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm,
                        step_per_layer=cfg.layer.combine == "sequential"),
        validation=solve_spec(cfg), entropy=entropy_control(cfg),
        seed=cfg.seed, max_nonfinite_steps=cfg.trainer.max_nonfinite_steps, reference=reference,
        shard_param_dtype=torch.bfloat16 if bf16_mixed else None, hparams=config_dict(cfg),
        refill=Refill((stream or problem_stream(cfg)).refill if g.dynamic_sampling else None),
        ref_sync=(ReferenceSync(reference, g.ref_model_mixup_alpha, g.ref_model_sync_steps)
                  if g.sync_ref_model and reference is not None else None),
        fp32_head=g.cast_lm_head_to_fp32)


def train_loader(stream, module_):
    """The training DataLoader: one whole step's problems per item, continuing at the module's
    ``batches_done`` on the module's rank (every rank draws its own, so groups are never split)."""
    from itertools import count

    from torch.utils.data import DataLoader, IterableDataset

    class StepBatches(IterableDataset):
        def __iter__(self):
            rank = module_.global_rank
            return (stream.batch(step, rank) for step in count(module_.batches_done))

    return DataLoader(StepBatches(), batch_size=None, collate_fn=lambda batch: batch)


def val_loader(problems: list, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(problems, batch_size=batch_size, collate_fn=list, shuffle=False)


@dataclass
class Data:
    """The problems of a training run: the step-indexed training stream and the held-out set."""

    stream: Any
    held_out: list


def data(cfg: Any) -> Data:
    """Read the data set first: a bad file fails before any model loads."""
    return Data(problem_stream(cfg), held_out(cfg).problems)


@dataclass
class Training:
    """What ``mgrpo train`` runs: the module (policy, tokenizer, engine inside) and its data."""

    module: Any
    train_loader: Any
    val_loader: Any
    n_val: int
    source: str  # where the policy came from


def training(cfg: Any, reward_fn, problems: Data, start: Optional[str] = None) -> Training:
    """Policy (from ``start``, a warm start or export folder, else ``model.path``), module and loaders."""
    policy_model, tok, source = policy(cfg, start)
    policy_model.train()  # from_pretrained returns eval mode; training starts in train mode
    mod = module(cfg, policy_model, tok, reward_fn, problems.stream)
    held_out = without_overlong(problems, mod.renderer, cfg.model.max_prompt_length)
    return Training(mod, train_loader(problems.stream, mod), val_loader(held_out, cfg.eval.batch_size),
                    len(held_out), source)


def without_overlong(problems: Data, renderer, max_prompt_length: int) -> list:
    """verl's ``filter_overlong_prompts``: the training pool (in place) and the held-out problems without
    the questions whose prompt is longer than ``max_prompt_length`` tokens (logged); the held-out ones."""
    pool = problems.stream.pool
    if pool is not None:
        kept = [p for p, ok in zip(pool, renderer.fits([p.question for p in pool]), strict=True) if ok]
        if not kept:
            raise bad_value("model.max_prompt_length", max_prompt_length, "every training question's prompt is "
                            "longer: give a larger budget")
        if len(kept) < len(pool):
            log.warning("skipped %d training questions longer than model.max_prompt_length=%d tokens",
                        len(pool) - len(kept), max_prompt_length)
        problems.stream.pool = kept
    fits = renderer.fits([p.question for p in problems.held_out])
    held_out = [p for p, ok in zip(problems.held_out, fits, strict=True) if ok]
    if len(held_out) < len(problems.held_out):
        log.warning("skipped %d held-out questions longer than model.max_prompt_length=%d tokens",
                    len(problems.held_out) - len(held_out), max_prompt_length)
    return held_out


def strategy(cfg: Any):
    """The Lightning strategy of ``trainer.strategy``: ddp as is; fsdp = FSDP2 over all ranks
    (``ModelParallelStrategy``, the module shards the policy); deepspeed = ZeRO stage 2."""
    t = cfg.trainer
    if t.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=t.deepspeed_stage or 2)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # one full checkpoint file (rank 0 gathers it), which `mgrpo eval checkpoint=...` reads
        return ModelParallelStrategy(data_parallel_size=t.devices * t.num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    return t.strategy


def callbacks(cfg: Any, out: Path, run_logger=None, stopper=None, writer=None, best=None) -> list:
    """Every callback of a training run, in order: step checkpoints under ``<out>/checkpoints`` through
    ``writer`` (default :func:`checkpoint_writer`), the rich progress bar in steps (``step 120/300``),
    the run's outputs (``training.callbacks``: the held-out files under ``out`` and in the MLflow run;
    with an MLflow run its outbox forced to disk at every checkpoint and the samples table every
    ``logger.samples_every`` steps), the stop-request checkpoints (``stopper``, a
    ``lifecycle.StopAndCheckpoint``) and, with ``trainer.weight_checksums``, the weight checksums;
    ``best`` (:func:`best_checkpoints`) goes before the held-out files (see ``training.best``)."""
    from mgrpo_cli.training.callbacks import HeldoutFiles, SamplesTable, TrackingOnDisk
    from mgrpo_cli.training.checkpointing import StepCheckpoint
    from mgrpo_cli.training.distributed import weight_checksums_callback
    from mgrpo_cli.training.progress import StepProgressBar

    t = cfg.trainer
    found: list = [StepCheckpoint(writer or checkpoint_writer(cfg, out), every=t.checkpoint_every), StepProgressBar(),
                   *([best] if best is not None else []), HeldoutFiles(out, run_logger)]
    if run_logger is not None:
        found.append(TrackingOnDisk(run_logger))
        if cfg.logger.samples_every:
            found.append(SamplesTable(run_logger, cfg.logger.samples_every, cfg.logger.samples_n))
    if stopper is not None:
        found.append(stopper)
    if t.weight_checksums:
        found.append(weight_checksums_callback(out))
    return found


def best_checkpoints(cfg: Any, out: Path, writer):
    """With ``trainer.monitor``, the callback keeping the ``trainer.save_top_k`` best validations' checkpoints
    through ``writer`` and stopping after ``trainer.early_stop_patience`` validations without improvement;
    else None."""
    t = cfg.trainer
    if t.monitor is None:
        return None
    from mgrpo_cli.training.best import PREFIX, BestCheckpoints, Monitor

    return BestCheckpoints(Monitor(str(t.monitor)[len(PREFIX):], str(t.monitor_mode), t.save_top_k,
                                   t.early_stop_patience), writer, out)


def checkpoint_writer(cfg: Any, out: Path):
    """The writer of every checkpoint file under ``<out>/checkpoints`` (``trainer.keep_checkpoints``)."""
    from mgrpo_cli.training.checkpointing import CheckpointWriter

    return CheckpointWriter(out / "checkpoints", keep=cfg.trainer.keep_checkpoints)


def trainer(cfg: Any, out: Path, logger=None, callbacks: Optional[list] = None):
    """The Lightning Trainer of ``trainer.*`` with ``callbacks`` (:func:`callbacks`)."""
    import lightning as L

    from mgrpo_cli.training.checkpointing import DirectCheckpointIO

    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy(cfg),
        precision=t.precision, max_steps=t.max_steps, max_time=t.max_time, val_check_interval=t.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=1, logger=logger or False,
        deterministic=t.deterministic,
        callbacks=list(callbacks or []), enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(out), use_distributed_sampler=False,
        plugins=[] if t.strategy == "deepspeed" else [DirectCheckpointIO()])  # DeepSpeed writes its own files


# ---------------------------------------------------------------------------------------------- eval's policy

def scored_policy(cfg: Any, start: Optional[str] = None):
    """(policy, tokenizer, source) for ``mgrpo eval``: ``checkpoint`` (an mgrpo .ckpt, rebuilt with the
    model and LoRA settings it was trained with; a ``model.<key>``/``lora.<key>`` override still wins),
    else ``model.path``, else ``start`` (the tiny model's warm start)."""
    if not cfg.checkpoint:
        return policy(cfg, None if cfg.model.path else start)
    saved = checkpoint_config(cfg.checkpoint, "checkpoint")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides()}
    keep = {group: {k: v for k, v in (saved.get(group) or {}).items() if f"{group}.{k}" not in given}
            for group in ("model", "lora")}
    cfg = OmegaConf.merge(cfg, keep)
    model, tok, _ = policy(cfg)
    load_policy_weights(model, cfg.checkpoint)
    return model, tok, str(cfg.checkpoint)


def load_policy_weights(model, checkpoint: str | Path) -> None:
    """The policy's weights of an mgrpo Lightning checkpoint into ``model`` (built with the run's settings)."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    model.load_state_dict({k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")})
