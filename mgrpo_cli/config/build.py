"""The build layer: the only code below the commands that reads the whole config.

``check(cfg, command)`` checks every rule of the config once, before any model loads, and raises
``UserError`` with one line naming the key and value. The other functions turn the config into the
plain objects the rest of the code takes: the reward function (with the grader), the policy and
tokenizer (the tiny model's warm start is its own explicit step, :func:`warm_start`), the prompt
renderer, the rollout engine, the :class:`~mgrpo_cli.algo.loss.LossSpec`, one
:class:`~mgrpo_cli.algo.layers.LayerSpec` per depth, the :class:`~mgrpo_cli.algo.solve.SolveSpec` of validation
and eval, the problem stream, the Lightning module, the strategy and the Trainer.

``mgrpo train`` and ``mgrpo eval`` (and the benchmarks, scripts and tests) call these; below them
nothing sees ``cfg``.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from mgrpo_cli.config.errors import UserError, bad_value

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------- rules

def _positive(v) -> bool:
    return v is not None and v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: v is not None and v >= n


def _unset_or(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or pred(v)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# (key, rule, what is wrong and what would be right); every command
COMMON_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", _at_least(0), "a seed must be >= 0"),
    ("model.max_prompt_length", _at_least(1), "the prompt budget must be at least 1 token"),
    ("model.max_completion_length", _at_least(1), "the answer budget must be at least 1 token"),
    ("model.max_correction_length", _unset_or(_at_least(1)), "the correction budget must be at least 1 token (or null)"),
    ("model.random_init_layers", _unset_or(_at_least(1)), "a random-initialised model needs at least 1 layer (or null)"),
    ("layer.max_new_tokens", _unset_or(_at_least(1)), "the correction budget must be at least 1 token (or null)"),
    ("eval.n", _at_least(1), "need at least 1 sample per problem"),
    ("eval.batch_size", _at_least(1), "a batch holds at least 1 problem"),
    ("eval.limit", _unset_or(_at_least(1)), "keep at least 1 problem (or null for all)"),
    ("eval.temperature", _at_least(0), "a temperature must be >= 0 (0 = greedy)"),
    ("eval.max_new_tokens", _unset_or(_at_least(1)), "the answer budget must be at least 1 token (or null)"),
    ("reward.timeout_s", lambda v: _finite(v) and v > 0, "the grader's time limit must be a positive number of seconds"),
    ("trainer.threads", _unset_or(_at_least(1)), "use at least 1 thread (or null to leave torch's default)"),
    ("logger.samples_every", _at_least(0), "log samples every N >= 1 steps, or 0 for never"),
    ("logger.samples_n", _at_least(1), "log at least 1 sample"),
]
TRAIN_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("grpo.num_generations", _at_least(2), "GRPO needs at least 2 samples per group"),
    ("grpo.prompts_per_step", _at_least(1), "a step needs at least 1 prompt"),
    ("grpo.temperature", _positive, "sampling at temperature 0 gives every sample of a group the same reward, "
                                    "so no advantage is ever non-zero; use a temperature > 0"),
    ("grpo.top_p", lambda v: v is not None and 0 < v <= 1, "top_p must be in (0, 1]"),
    ("grpo.epsilon", _at_least(0), "the clip range must be >= 0"),
    ("grpo.epsilon_high", _unset_or(_at_least(0)), "the upper clip range must be >= 0 (or null = grpo.epsilon)"),
    ("grpo.beta", _at_least(0), "the KL weight must be >= 0"),
    ("grpo.std_eps", _at_least(0), "the advantage's std epsilon must be >= 0"),
    ("grpo.lr", _positive, "the learning rate must be > 0"),
    ("grpo.weight_decay", _at_least(0), "weight decay must be >= 0"),
    ("grpo.max_grad_norm", _positive, "the gradient-norm clip must be > 0"),
    ("grpo.micro_batch_tokens", _at_least(1), "a micro-batch holds at least 1 token"),
    ("grpo.num_iterations", _at_least(1), "each rollout needs at least 1 update"),
    ("grpo.delta", _unset_or(_finite), "delta caps the ratio: a number > 1 + epsilon_high, or null for off"),
    ("grpo.top_entropy_quantile", lambda v: v is not None and 0 < v <= 1,
     "the share of tokens trained on is in (0, 1] (1.0 = every token)"),
    ("grpo.max_sampling_rounds", _at_least(1), "a layer makes at least 1 rollout per step"),
    ("grpo.top_k", _at_least(0), "top_k keeps the k most likely tokens: an integer >= 0 (0 = all)"),
    ("grpo.min_p", _unset_or(lambda v: 0 <= v <= 1), "min_p is a share of the top probability in [0, 1] (or null)"),
    ("grpo.repetition_penalty", lambda v: _finite(v) and v > 0, "the repetition penalty must be > 0 (1 = off)"),
    ("grpo.sapo_temperature_pos", lambda v: _finite(v) and v > 0, "SAPO's gate temperature must be > 0"),
    ("grpo.sapo_temperature_neg", lambda v: _finite(v) and v > 0, "SAPO's gate temperature must be > 0"),
    ("grpo.vespo_k_pos", lambda v: _finite(v) and v >= 0, "VESPO's power k must be a number >= 0"),
    ("grpo.vespo_k_neg", lambda v: _finite(v) and v >= 0, "VESPO's power k must be a number >= 0"),
    ("grpo.vespo_lambda_pos", lambda v: _finite(v) and v > 0, "VESPO's decay lambda must be > 0"),
    ("grpo.vespo_lambda_neg", lambda v: _finite(v) and v > 0, "VESPO's decay lambda must be > 0"),
    ("grpo.entropy_coef", lambda v: _finite(v) and v >= 0, "the entropy bonus's coefficient must be a number >= 0"),
    ("grpo.entropy_coef_delta", lambda v: _finite(v) and v > 0, "the adaptive coefficient's step must be > 0"),
    ("grpo.entropy_coef_min", lambda v: _finite(v) and v >= 0, "the adaptive coefficient's floor must be >= 0"),
    ("grpo.entropy_coef_max", _finite, "the adaptive coefficient's ceiling must be a finite number"),
    ("grpo.entropy_target", _unset_or(lambda v: _finite(v) and v >= 0), "a target entropy in nats is >= 0"),
    ("grpo.ref_model_mixup_alpha", lambda v: _finite(v) and 0 < v <= 1,
     "the reference moves alpha of the way to the policy: alpha in (0, 1]"),
    ("grpo.ref_model_sync_steps", _at_least(1), "sync the reference every N >= 1 optimizer steps"),
    ("grpo.off_policy_mask_threshold", _unset_or(lambda v: _finite(v) and v >= 0),
     "a mean log-ratio threshold >= 0 (e.g. 0.5), or null for off"),
    ("layer.depth", _at_least(1), "need at least 1 layer (1 = GRPO, 2 = MGRPO)"),
    ("layer.k", _at_least(1), "send at least 1 response per input to the next layer"),
    ("layer.weight", lambda v: _finite(v) and v >= 0, "the correction layers' loss weight must be a number >= 0"),
    ("layer.improvement_bonus", _finite, "the improvement bonus must be a finite number"),
    ("trainer.max_steps", _at_least(1), "train for at least 1 step"),
    ("trainer.val_every", _at_least(1), "validate every N >= 1 steps"),
    ("trainer.checkpoint_every", _at_least(1), "checkpoint every N >= 1 steps"),
    ("trainer.checkpoint_every_minutes", _unset_or(_positive), "checkpoint every N > 0 minutes (or null)"),
    ("trainer.max_nonfinite_steps", _at_least(0), "stop after N >= 1 non-finite steps in a row, or 0 for never"),
    ("trainer.num_nodes", _at_least(1), "need at least 1 node"),
    ("warmup.steps", _at_least(1), "the warm-up needs at least 1 step (or warmup.enabled=false)"),
    ("warmup.batch_size", _at_least(1), "a warm-up batch holds at least 1 example"),
    ("warmup.lr", _positive, "the warm-up learning rate must be > 0"),
    ("warmup.eval_every", _at_least(1), "check the warm-up every N >= 1 steps"),
    ("warmup.target_accuracy", lambda v: v is not None and 0 < v <= 1, "a target accuracy is in (0, 1]"),
    ("warmup.correction_share", lambda v: v is not None and 0 <= v <= 1, "a share is in [0, 1]"),
]


def check(cfg: Any, command: str = "train") -> None:
    """Every rule of ``cfg`` for ``command`` (train | eval), checked before anything loads."""
    rules = COMMON_RULES + (TRAIN_RULES if command == "train" else [])
    for key, ok, why in rules:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise bad_value(key, value, why)
    if command != "train" and cfg.get("resume"):
        raise bad_value("resume", cfg.resume, "continues a training run: mgrpo train resume=<run folder>")
    if command == "train":
        _check_train(cfg)
    elif cfg.eval.n > 1 and cfg.eval.temperature <= 0:
        raise bad_value("eval.temperature", cfg.eval.temperature, f"eval.n={cfg.eval.n} samples per problem need "
                        "a temperature > 0")
    _check_model(cfg)
    _check_reward(cfg)
    _check_dataset(cfg)
    if cfg.get("ckpt_path"):
        checkpoint_config(cfg.ckpt_path, "ckpt_path")
    if cfg.get("checkpoint"):
        checkpoint_config(cfg.checkpoint, "checkpoint")
    check_writable(cfg.paths.outputs, "paths.outputs")
    if cfg.get("export_to"):
        check_writable(cfg.export_to, "export_to")


def _check_train(cfg: Any) -> None:
    t, lay, g = cfg.trainer, cfg.layer, cfg.grpo
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    if g.delta is not None and g.delta <= 1 + eps_high:
        raise bad_value("grpo.delta", g.delta, f"the cap must lie above the clip range's top, 1 + epsilon_high = "
                        f"{1 + eps_high:g}, or it would change positive advantages too; or null for off")
    _check_loss(cfg)
    if lay.depth >= 2 and lay.group_size < 2:
        raise bad_value("layer.group_size", lay.group_size, f"layer.depth={lay.depth} corrects answers in groups "
                        "of H samples; GRPO needs H >= 2")
    if lay.depth >= 2 and not lay.phrases:
        raise bad_value("layer.phrases", "[]", "a correction layer needs at least one guiding phrase")
    if t.strategy == "fsdp" and not (isinstance(t.devices, int) and t.devices >= 1):
        raise bad_value("trainer.devices", t.devices, "trainer=fsdp needs a number of devices per node")
    if t.strategy == "deepspeed" and t.deepspeed_stage not in (None, 2):
        raise bad_value("trainer.deepspeed_stage", t.deepspeed_stage, "only ZeRO stage 2 is supported: stage 3 "
                        "would fetch parameters per module per decoded token; use trainer=fsdp (FSDP2)")
    ranks = t.devices * t.num_nodes if isinstance(t.devices, int) else 2
    lockstep = t.strategy in ("fsdp", "deepspeed") or lay.combine == "sequential"
    if ranks > 1 and lay.select == "wrong" and lay.depth > 1 and lockstep:
        raise bad_value("layer.select", "wrong", f"with trainer={t.name} a rank whose answers are all right would "
                        "skip layer 2 while the others run it, and their collectives would not match; use "
                        "layer.select=sample or all")
    if g.dynamic_sampling and t.strategy == "fsdp" and ranks > 1:
        raise bad_value("grpo.dynamic_sampling", True, "with trainer=fsdp every rollout gathers the sharded weights "
                        "(a collective), and ranks would make different numbers of rollouts; use trainer=ddp")
    if cfg.warmup.enabled and cfg.warmup.only and not _is_embedded(cfg):
        raise bad_value("warmup.only", True, "the warm-up makes the embedded tiny model's start; it needs "
                        "model=tiny with model.path=null")


CLIPPED_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "luspo")  # the loss types with PPO's clip (and delta)


def _check_loss(cfg: Any) -> None:
    """The combinations of loss, estimator and stabiliser keys that cannot work."""
    g, t = cfg.grpo, cfg.trainer
    loss = str(g.loss_type)
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    level = str(g.importance_sampling_level)
    if loss == "luspo" and level != "sequence":
        raise bad_value("grpo.loss_type", "luspo", "LUSPO scales GSPO's sequence loss by its length: it needs "
                        "grpo.importance_sampling_level=sequence")
    if loss == "vespo" and level != "token":
        raise bad_value("grpo.loss_type", "vespo", "VESPO weighs each sequence by its summed token log-ratios "
                        "itself: leave grpo.importance_sampling_level=token")
    if loss == "cispo" and eps_high < 1:
        raise bad_value("grpo.epsilon_high", g.epsilon_high, f"loss_type=cispo caps the importance weight itself at "
                        f"epsilon_high ({eps_high:g} would scale every token's gradient down); set the cap, e.g. "
                        "grpo.epsilon_high=5.0 (ScaleRL's eps_max)")
    if g.delta is not None and loss not in CLIPPED_LOSSES:
        raise bad_value("grpo.delta", g.delta, f"delta caps the clipped ratio, which loss_type={loss} has not; "
                        "use null")
    if str(g.adv_estimator) != "grpo" and str(g.scale_rewards) != "group":
        raise bad_value("grpo.scale_rewards", g.scale_rewards, f"scales the grpo estimator's advantages; "
                        f"adv_estimator={g.adv_estimator} has its own scaling: leave scale_rewards=group")
    if str(cfg.reward.multi_objective_aggregation) == "normalize_then_sum" and str(g.adv_estimator) != "grpo":
        raise bad_value("reward.multi_objective_aggregation", "normalize_then_sum", "GDPO normalises each reward "
                        "term itself; it replaces the estimator: use it with grpo.adv_estimator=grpo")
    if g.use_adaptive_entropy and g.entropy_target is None:
        raise bad_value("grpo.entropy_target", None, "use_adaptive_entropy steers the entropy to a target: set "
                        "grpo.entropy_target (nats; about the entropy logged early in training)")
    if not g.use_adaptive_entropy and g.entropy_target is not None:
        raise bad_value("grpo.entropy_target", g.entropy_target, "only the adaptive entropy control reads it: set "
                        "grpo.use_adaptive_entropy=true, or leave entropy_target null")
    if g.entropy_coef_min > g.entropy_coef_max:
        raise bad_value("grpo.entropy_coef_min", g.entropy_coef_min, f"the floor must not exceed the ceiling "
                        f"grpo.entropy_coef_max={g.entropy_coef_max}")
    if g.use_bias_correction_kl and g.beta <= 0:
        raise bad_value("grpo.use_bias_correction_kl", True, "corrects the KL term, which grpo.beta=0 turns off; "
                        "set grpo.beta > 0")
    if g.off_policy_mask_threshold is not None and g.num_iterations < 2:
        raise bad_value("grpo.off_policy_mask_threshold", g.off_policy_mask_threshold, "with num_iterations=1 the "
                        "policy is the one that sampled (log-ratio 0): nothing is ever masked; set "
                        "grpo.num_iterations >= 2")
    if g.sync_ref_model:
        if g.beta <= 0:
            raise bad_value("grpo.sync_ref_model", True, "moves the KL reference, and grpo.beta=0 has none; "
                            "set grpo.beta > 0")
        if cfg.lora.enabled:
            raise bad_value("grpo.sync_ref_model", True, "with LoRA the reference is the base model (the adapter "
                            "off), not a copy that can move; use full fine-tuning (lora=none)")
        if t.strategy == "fsdp":
            raise bad_value("grpo.sync_ref_model", True, "under trainer=fsdp the policy is sharded and the reference "
                            "is not; use trainer=ddp")


def _is_embedded(cfg: Any) -> bool:
    return cfg.model.path is None and cfg.model.name == "tiny"


def _check_model(cfg: Any) -> None:
    m = cfg.model
    if m.path is None:
        if m.name != "tiny":
            raise bad_value("model.path", None, f"model={m.name} needs a hub name (org/name) or a local folder")
        return
    path = Path(m.path)
    if path.exists():
        if not path.is_dir():
            raise bad_value("model.path", m.path, "is a file; give the model's folder (with config.json)")
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise bad_value("model.path", m.path, "holds no config.json: not a transformers model folder "
                            "(an export of mgrpo train, or a save_pretrained folder)")
        return
    if not HUB_ID.match(str(m.path)):
        raise bad_value("model.path", m.path, "no such folder, and not a hub name (org/name)")
    if _hub_offline() and not _in_hub_cache(str(m.path)):
        raise bad_value("model.path", m.path, "is not a local folder, not in the hub cache, and the hub is offline "
                        "(HF_HUB_OFFLINE=1): download it first or give a local folder")


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


def _check_reward(cfg: Any) -> None:
    terms = cfg.reward.terms
    if not terms:
        raise bad_value("reward.terms", "[]", "give at least one {name, weight}")
    from mgrpo_cli.grading.rewards import REWARD_TERMS
    from mgrpo_cli.grading.terms import RewardTermError, resolve_reward_function

    for i, term in enumerate(terms):
        if ":" in term.name:
            try:
                resolve_reward_function(term.name)
            except RewardTermError as e:
                raise bad_value(f"reward.terms[{i}].name", term.name, e.reason) from None
        elif term.name not in REWARD_TERMS:
            raise bad_value(f"reward.terms[{i}].name", term.name, "known terms: accuracy, format, or an own "
                            "function's import path package.module:function")
        if not _finite(term.weight):
            raise bad_value(f"reward.terms[{i}].weight", term.weight, "a weight must be a finite number")


def _check_dataset(cfg: Any) -> None:
    d = cfg.dataset
    if d.kind == "arith":
        a = d.arith
        if not 2 <= a.min_operands <= a.max_operands:
            raise bad_value("dataset.arith.min_operands", a.min_operands,
                            f"need 2 <= min_operands <= max_operands (max_operands={a.max_operands})")
        if a.max_operand < 1:
            raise bad_value("dataset.arith.max_operand", a.max_operand, "operands are 1..max_operand: need >= 1")
        if not a.ops or not set(a.ops) <= {"+", "-"}:
            raise bad_value("dataset.arith.ops", a.ops, "only '+' and '-' are supported")
        if not 0 <= a.shortcut_prob <= 1:
            raise bad_value("dataset.arith.shortcut_prob", a.shortcut_prob, "a probability is in [0, 1]")


def check_writable(folder: str, key: str) -> None:
    """``folder`` exists (made if missing) and takes a file, else a UserError naming ``key``."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise bad_value(key, folder, "is a file; give a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mgrpo-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise bad_value(key, folder, f"not a writable folder ({e.strerror or e}); give a folder you can write to") from None


def checkpoint_config(path: str, key: str) -> dict:
    """The config saved in an mgrpo Lightning checkpoint (tensors are memory-mapped, not read)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise bad_value(key, path, "no such file; give a .ckpt of mgrpo train (<run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise bad_value(key, path, f"not a PyTorch checkpoint ({type(e).__name__}); give a .ckpt of mgrpo train") from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise bad_value(key, path, "not a Lightning checkpoint of mgrpo train (no saved config or state_dict)")
    return config


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


def run_logger(cfg: Any, run_name: str, run_folder: Optional[Path] = None, run_id: Optional[str] = None):
    """The MLflow run of this command (``logger.enabled``), or None; ``run_id`` reopens a run (resume=).
    Tagged with the run folder (``run_dir``, how ``mgrpo report`` finds a folder's run) and, in a
    sweep, with the sweep's parent run (``mlflow.parentRunId`` from ``sweep.PARENT_ENV``), which nests
    it under that run."""
    if not cfg.logger.enabled:
        return None
    from mgrpo_cli.reporting.sweep import PARENT_ENV
    from mgrpo_cli.reporting.tracking import RunLogger, default_tracking_uri

    uri = cfg.logger.tracking_uri or default_tracking_uri(cfg.paths.outputs)
    tags = {"overrides": " ".join(overrides()) or "(none)", "task": cfg.task_name}
    if run_folder is not None:
        tags["run_dir"] = str(Path(run_folder).resolve())
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    return RunLogger(uri, cfg.logger.experiment, run_name, params=config_dict(cfg),
                     artifacts=Path(cfg.paths.outputs).resolve() / "mlartifacts", tags=tags, run_id=run_id)


# ---------------------------------------------------------------------------------------------- objects

def reward(cfg: Any):
    """The reward function of ``cfg.reward``, with its own grader (shared by training and eval)."""
    from mgrpo_cli.grading.grader import Grader
    from mgrpo_cli.grading.rewards import RewardFunction

    r = cfg.reward
    return RewardFunction([(t.name, t.weight) for t in r.terms],
                          Grader(timeout_s=r.timeout_s, last_number_fallback=r.last_number_fallback),
                          format_style=str(r.format_style))


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
    if not (_is_embedded(cfg) and cfg.warmup.enabled):
        return None
    from mgrpo_cli.training.warmup import warm_start as make_warm_start

    return str(make_warm_start(warmup_spec(cfg), reward_fn.grader.correct, should_stop or (lambda: False)))


def model_spec(m: Any):
    """The ``model`` section as the plain ``models.ModelSpec`` that loads or builds the policy."""
    from mgrpo_cli.data.models import ModelSpec

    return ModelSpec(name=m.name, path=m.path, dtype=str(m.dtype), attn_implementation=m.attn_implementation,
                     gradient_checkpointing=m.gradient_checkpointing, trust_remote_code=m.trust_remote_code,
                     random_init_layers=m.random_init_layers, hidden_size=m.hidden_size,
                     intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                     num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads)


def lora_spec(lo: Any):
    """The ``lora`` section as the plain ``models.LoraSpec``."""
    from mgrpo_cli.data.models import LoraSpec

    return LoraSpec(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=tuple(lo.target_modules),
                    export=str(lo.export))


def policy(cfg: Any, path: Optional[str] = None, *, lora: bool = True):
    """(policy, tokenizer, source): ``path`` (a warm start or export folder), else ``model.path``, else
    the randomly initialised tiny model; LoRA applied when ``lora.enabled``."""
    from mgrpo_cli.data.models import apply_lora, cast_lm_head_to_fp32, disable_dropout, load_policy

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


def renderer(cfg: Any, tokenizer):
    from mgrpo_cli.rollout.prompts import PromptRenderer

    if cfg.model.prompt_template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise bad_value("model.prompt_template", "chat", "the tokenizer has no chat template; use plain")
    lay = cfg.layer
    return PromptRenderer(tokenizer, cfg.model.prompt_template, cfg.system_prompt, lay.input_mode,
                          lay.phrase_template, lay.new_turn_prompt)


def engine(cfg: Any, model, tokenizer):
    from mgrpo_cli.rollout.engine import HFEngine

    return HFEngine(model, tokenizer, max_prompt_length=cfg.model.max_prompt_length, seed=cfg.seed)


def loss_spec(cfg: Any):
    from mgrpo_cli.algo.loss import LossSpec

    g = cfg.grpo
    return LossSpec(beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
                    loss_type=str(g.loss_type), scale_rewards=str(g.scale_rewards), std_eps=g.std_eps,
                    temperature=g.temperature, top_p=g.top_p, micro_batch_tokens=g.micro_batch_tokens,
                    max_completion_length=cfg.model.max_completion_length, num_iterations=g.num_iterations,
                    mask_truncated_completions=g.mask_truncated_completions,
                    importance_sampling_level=str(g.importance_sampling_level), delta=g.delta,
                    top_entropy_quantile=g.top_entropy_quantile, top_k=g.top_k, min_p=g.min_p,
                    repetition_penalty=g.repetition_penalty, sapo_temperature_pos=g.sapo_temperature_pos,
                    sapo_temperature_neg=g.sapo_temperature_neg,
                    vespo=(g.vespo_k_pos, g.vespo_lambda_pos, g.vespo_k_neg, g.vespo_lambda_neg),
                    adv_estimator=str(g.adv_estimator),
                    multi_objective_aggregation=str(cfg.reward.multi_objective_aggregation),
                    off_policy_mask_threshold=g.off_policy_mask_threshold, bias_correction_kl=g.use_bias_correction_kl,
                    entropy_coef=g.entropy_coef, adaptive_entropy=g.use_adaptive_entropy,
                    entropy_target=g.entropy_target if g.entropy_target is not None else 0.0,
                    entropy_coef_delta=g.entropy_coef_delta, entropy_coef_min=g.entropy_coef_min,
                    entropy_coef_max=g.entropy_coef_max)


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
                      dynamic_sampling=g.dynamic_sampling, max_sampling_rounds=g.max_sampling_rounds)
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
    """How held-out problems are answered: validation during training (greedy), or ``mgrpo eval``."""
    from mgrpo_cli.algo.solve import SolveSpec

    ev = cfg.eval
    first = (ev.max_new_tokens if command == "eval" else None) or cfg.model.max_completion_length
    phrase = cfg.layer.eval_phrase if ev.two_pass else None
    if command == "eval":
        return SolveSpec(first, correction_budget(cfg, first), ev.batch_size, ev.n, ev.temperature, phrase)
    return SolveSpec(first, correction_budget(cfg), ev.batch_size, phrase=phrase)


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

    from mgrpo_cli.data.models import reference_policy
    from mgrpo_cli.training.module import MGRPOModule, OptimSpec, RefSync

    g = cfg.grpo
    bf16_mixed = str(cfg.trainer.precision).startswith("bf16-mixed")
    return MGRPOModule(
        policy_model, tokenizer, engine=engine(cfg, policy_model, tokenizer), renderer=renderer(cfg, tokenizer),
        reward_fn=reward_fn, layers=layer_specs(cfg), loss=loss_spec(cfg),
        optim=OptimSpec(lr=g.lr, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm,
                        step_per_layer=cfg.layer.combine == "sequential"),
        validation=solve_spec(cfg),
        seed=cfg.seed, max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        reference=reference_policy(policy_model, g.beta),
        shard_param_dtype=torch.bfloat16 if bf16_mixed else None, hparams=config_dict(cfg),
        refill=(stream or problem_stream(cfg)).refill if g.dynamic_sampling else None,
        ref_sync=RefSync(g.ref_model_mixup_alpha, g.ref_model_sync_steps) if g.sync_ref_model else None,
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
    return Training(mod, train_loader(problems.stream, mod), val_loader(problems.held_out, cfg.eval.batch_size),
                    len(problems.held_out), source)


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


def run_callbacks(cfg: Any, out: Path, run_logger=None) -> list:
    """The training run's outputs (``training.callbacks``): the held-out files under ``out`` (and in the
    MLflow run), and with an MLflow run the samples table every ``logger.samples_every`` steps."""
    from mgrpo_cli.training.callbacks import HeldoutFiles, SamplesTable

    found: list = [HeldoutFiles(out, run_logger)]
    if run_logger is not None and cfg.logger.samples_every:
        found.append(SamplesTable(run_logger, cfg.logger.samples_every, cfg.logger.samples_n))
    return found


def trainer(cfg: Any, out: Path, logger=None, callbacks: Optional[list] = None):
    """The Lightning Trainer: step-based checkpoints under ``<out>/checkpoints``, the rich progress bar
    in steps (``step 120/300``)."""
    import lightning as L

    from mgrpo_cli.training.checkpointing import StepCheckpoint
    from mgrpo_cli.training.progress import StepProgressBar

    t = cfg.trainer
    ckpt = StepCheckpoint(out / "checkpoints", every=t.checkpoint_every)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy(cfg),
        precision=t.precision, max_steps=t.max_steps, max_time=t.max_time, val_check_interval=t.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=1, logger=logger or False,
        callbacks=[ckpt, StepProgressBar(), *(callbacks or [])], enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(out), use_distributed_sampler=False)


# ---------------------------------------------------------------------------------------------- eval's policy

def scored_policy(cfg: Any, start: Optional[str] = None):
    """(policy, tokenizer, source) for ``mgrpo eval``: ``checkpoint`` (an mgrpo .ckpt, rebuilt with the
    model and LoRA settings it was trained with; a ``model.<key>``/``lora.<key>`` override still wins),
    else ``model.path``, else ``start`` (the tiny model's warm start)."""
    if not cfg.checkpoint:
        return policy(cfg, None if cfg.model.path else start)
    import torch

    saved = checkpoint_config(cfg.checkpoint, "checkpoint")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides()}
    keep = {group: {k: v for k, v in (saved.get(group) or {}).items() if f"{group}.{k}" not in given}
            for group in ("model", "lora")}
    cfg = OmegaConf.merge(cfg, keep)
    model, tok, _ = policy(cfg)
    ckpt = torch.load(cfg.checkpoint, map_location="cpu", weights_only=False, mmap=True)
    state = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    model.load_state_dict(state)
    return model, tok, str(cfg.checkpoint)
