"""The config's rules: ``check(cfg, command)`` checks every one once, before any model loads.

Most are a table (key, rule, what is wrong and what would be right); the rest, rules between keys
(the loss, the model's path, the reward's terms, the data set), are functions below it. A broken rule
raises ``UserError`` with one line naming the key and the value. Allowed values of a closed set are
the schema's enums (``config.schema``), checked by Hydra when the config is composed.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mgrpo_cli.errors import bad_value

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
    ("reward.random_probability", lambda v: _finite(v) and 0 <= v <= 1,
     "the random reward's chance of 1 is a probability in [0, 1]"),
    ("reward.overlong_buffer_len", _unset_or(_at_least(1)),
     "the overlong buffer is the last N >= 1 tokens of a layer's budget (or null for off)"),
    ("reward.overlong_penalty_factor", lambda v: _finite(v) and v >= 0,
     "the overlong penalty at the budget is a number >= 0"),
    ("grpo.rollout_is_cap", lambda v: _finite(v) and v >= 1,
     "the importance weights' cap must be >= 1 (below 1 it would shrink every weight; verl uses 2, TRL 3)"),
    ("layer.depth", _at_least(1), "need at least 1 layer (1 = GRPO, 2 = MGRPO)"),
    ("layer.k", _at_least(1), "send at least 1 response per input to the next layer"),
    ("layer.weight", lambda v: _finite(v) and v >= 0, "the correction layers' loss weight must be a number >= 0"),
    ("layer.improvement_bonus", _finite, "the improvement bonus must be a finite number"),
    ("trainer.max_steps", _at_least(1), "train for at least 1 step"),
    ("trainer.val_every", _at_least(1), "validate every N >= 1 steps"),
    ("trainer.checkpoint_every", _at_least(1), "checkpoint every N >= 1 steps"),
    ("trainer.keep_checkpoints", _at_least(1), "keep the N >= 1 newest step checkpoints"),
    ("trainer.save_top_k", _at_least(0), "keep N >= 0 best checkpoints (0 = none)"),
    ("trainer.early_stop_patience", _unset_or(_at_least(1)),
     "stop after N >= 1 validations without improvement (or null for never)"),
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
    if cfg.eval.n > 1 and cfg.eval.temperature <= 0:
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
    _check_monitor(cfg)
    m = cfg.model
    if m.rollout_dtype is not None and (str(m.dtype) != "float32" or not str(t.precision).startswith("32")):
        raise bad_value("model.rollout_dtype", str(m.rollout_dtype), f"samples a float32 model in lower precision, and "
                        f"this one trains in model.dtype={m.dtype} with trainer.precision={t.precision}; use "
                        "model.dtype=float32 with trainer.precision=32-true, or rollout_dtype=null")
    buffer = cfg.reward.overlong_buffer_len
    if buffer is not None:
        budgets = {"model.max_completion_length": cfg.model.max_completion_length}
        if lay.depth >= 2:  # the corrections' budget, as cli.build.correction_budget reads it
            budgets["the correction budget"] = (lay.max_new_tokens or cfg.model.max_correction_length
                                                or cfg.model.max_completion_length)
        for name, budget in budgets.items():
            if buffer >= budget:
                raise bad_value("reward.overlong_buffer_len", buffer, f"the buffer must be shorter than each layer's "
                                f"token budget ({name} = {budget}), or every completion would be penalised")
    if cfg.warmup.enabled and cfg.warmup.only and not is_embedded(cfg):
        raise bad_value("warmup.only", True, "the warm-up makes the embedded tiny model's start; it needs "
                        "model=tiny with model.path=null")


def _check_monitor(cfg: Any) -> None:
    """``trainer.monitor`` names a metric validation logs; early stop needs one."""
    from mgrpo_cli.reporting.metrics import summary_keys

    t = cfg.trainer
    if t.monitor is None:
        if t.early_stop_patience is not None:
            raise bad_value("trainer.early_stop_patience", t.early_stop_patience, "stops when the monitored metric "
                            "stops improving: set trainer.monitor (e.g. val/acc_t2)")
        return
    if t.strategy == "deepspeed" and t.save_top_k > 0:
        raise bad_value("trainer.save_top_k", t.save_top_k, "trainer=deepspeed writes a checkpoint folder per "
                        "rank, which export-best/ cannot read; use trainer=ddp or fsdp, or save_top_k=0")
    keys = summary_keys(cfg.eval.n, cfg.eval.two_pass)
    if not str(t.monitor).startswith("val/") or str(t.monitor)[4:] not in keys:
        raise bad_value("trainer.monitor", t.monitor, f"validation (eval.n={cfg.eval.n}, eval.two_pass="
                        f"{cfg.eval.two_pass}) logs {', '.join('val/' + k for k in keys if k != 'n')}")


def clipped_losses() -> list[str]:
    """The loss types whose policy term is PPO's clipped ratio (``delta`` caps only that), from the
    loss registry (``algo.grpo.LOSS_TYPES``)."""
    from mgrpo_cli.algo.grpo import LOSS_TYPES

    return [name for name, kind in LOSS_TYPES.items() if kind.clipped]


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
    if g.delta is not None and loss not in clipped_losses():
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


def is_embedded(cfg: Any) -> bool:
    return cfg.model.path is None and cfg.model.name == "tiny"


def _check_model(cfg: Any) -> None:
    m = cfg.model
    if m.max_correction_prompt_length is not None and m.max_correction_prompt_length <= m.max_prompt_length:
        raise bad_value("model.max_correction_prompt_length", m.max_correction_prompt_length,
                        f"a correction prompt holds the question's prompt (up to model.max_prompt_length="
                        f"{m.max_prompt_length}) and more: give a larger budget, or null")
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
