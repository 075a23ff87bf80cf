"""Structured-config schemas for every config group, and where conf/ lives.

Hydra composes the YAML files under ``conf/`` on top of these dataclasses, so a misspelt key or a
value of the wrong type fails at compose time with the key and value named. Numbers that matter
(clip range, temperature, eps) have their one default here.

This module imports no torch: ``mgrpo`` with no command must answer fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$MGRPO_CONF_DIR``; else the installed package's ``mgrpo_cli/conf`` (a wheel
    carries a copy); else the one at the top of the repository (a clone, an editable install)."""
    env = os.environ.get("MGRPO_CONF_DIR")
    package = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [package / "conf", package.parent / "conf"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"mgrpo: no conf/train.yaml under {' or '.join(str(c) for c in candidates)}. Reinstall the package "
        "(a wheel carries conf/; from a clone: pip install -e .), or set MGRPO_CONF_DIR to a conf/ folder."
    )


# The data folder holds <dataset name>/<split>.jsonl: the environment variable, else this cache folder
DATA_DIR_ENV = "MGRPO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/mgrpo/data"


def _choice(name: str, *values: str) -> type[StrEnum]:
    """A closed set of string values: a typo fails at compose time with the allowed values named."""
    return StrEnum(name, {v: v for v in values})


PromptTemplate = _choice("PromptTemplate", "plain", "chat")
DatasetKind = _choice("DatasetKind", "arith", "file", "hub")
AnswerFormat = _choice("AnswerFormat", "answer", "gsm8k", "boxed", "list")
OnBadRow = _choice("OnBadRow", "error", "skip")
FormatStyle = _choice("FormatStyle", "boxed", "think")
InputMode = _choice("InputMode", "continue", "new_turn")
Select = _choice("Select", "all", "wrong", "sample")
L2Reward = _choice("L2Reward", "correct", "improvement")
Keep = _choice("Keep", "all", "successful")
Combine = _choice("Combine", "sum", "sequential")
LossType = _choice("LossType", "grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
AdvEstimator = _choice("AdvEstimator", "grpo", "rloo", "reinforce_plus_plus_baseline")
MultiObjectiveAggregation = _choice("MultiObjectiveAggregation", "sum_then_normalize", "normalize_then_sum")
ScaleRewards = _choice("ScaleRewards", "group", "batch", "none")
ImportanceSamplingLevel = _choice("ImportanceSamplingLevel", "token", "sequence")
LoraExport = _choice("LoraExport", "merged", "adapter")
WarmupTask = _choice("WarmupTask", "dataset", "default")
Dtype = _choice("Dtype", "auto", "float32", "bfloat16", "float16")
MonitorMode = _choice("MonitorMode", "max", "min")
RolloutDtype = _choice("RolloutDtype", "bfloat16", "float16")
RolloutIS = _choice("RolloutIS", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class ModelConfig:
    """The defaults are the embedded tiny model's (``model=tiny``, the default run's); the other model
    files set what differs for them."""

    name: str = "tiny"
    # hub name or local folder; null = build the embedded tiny model (tiny only)
    path: Optional[str] = None
    dtype: Dtype = Dtype.float32  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    # bfloat16 | float16: a float32 model samples under torch.autocast to this dtype (as a bf16
    # inference engine samples) while training stays in float32; null = sample in the model's precision
    rollout_dtype: Optional[RolloutDtype] = None
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # a question's prompt budget: a longer question is skipped and counted, never cut
    max_prompt_length: int = 512
    # a correction prompt's budget (layers 2+, eval's t2): earlier answers are shortened from their start to
    # fit, never the question; null = the model's max_position_embeddings minus the correction budget
    max_correction_prompt_length: Optional[int] = None
    # the first answer gets less room than a careful second look: on the tiny model's task, 32 new
    # tokens fit a one-operation-per-step solution of 2-3 operands (4 operands need the one-step
    # shortcut), 48 fit every careful solution
    max_completion_length: int = 32
    # budget of the corrections (layers 2+, eval's t2); null = max_completion_length; layer.max_new_tokens overrides
    max_correction_length: Optional[int] = 48
    prompt_template: PromptTemplate = PromptTemplate.plain
    # tiny model architecture (used only when path is null and name == tiny)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # random-initialised stand-in for tests: keep the architecture of `path`'s config, this many layers
    random_init_layers: Optional[int] = None
    trust_remote_code: bool = False


@dataclass
class FieldMap:
    question: str = "question"
    answer: Optional[str] = "answer"
    solution: Optional[str] = None
    subject: Optional[str] = None
    level: Optional[str] = None
    id: Optional[str] = None


@dataclass
class ArithConfig:
    min_operands: int = 2
    max_operands: int = 4
    max_operand: int = 20
    ops: str = "+-"
    # share of the warm-up's first-attempt solutions that give the result in one step
    shortcut_prob: float = 0.5
    n_test: int = 400
    n_valid: int = 200  # warm-up's own check set, disjoint from test


@dataclass
class DatasetConfig:
    name: str = "arith"  # also the data folder's subfolder: <paths.data>/<name>/<split>.jsonl
    # arith: the embedded task | file: {split}_path, else the data folder | hub: {split}_path, else the
    # data folder, else the Hub (written to the data folder on first use)
    kind: DatasetKind = DatasetKind.arith
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    # hub data set (org/name, or a local folder datasets.load_dataset reads), its config and split names;
    # a split set to null does not exist on the Hub (e.g. MATH-500 has only a test split)
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    # the Hub set's revision (a commit, tag or branch) load_dataset reads; null = its main branch. The
    # revision actually loaded is kept beside the split in the data folder (<split>.source.json)
    hub_revision: Optional[str] = None
    train_split: Optional[str] = "train"
    test_split: Optional[str] = "test"
    # the Hub's column names -> the names `fields` uses, applied when a split is written to the data folder
    hub_rename: dict[str, str] = field(default_factory=dict)
    fields: FieldMap = field(default_factory=FieldMap)
    # how the gold answer is read: answer (as is) | gsm8k (#### N) | boxed (last \boxed{} of solution,
    # or answer when given) | list (a list, as OlympiadBench's final_answer on the Hub, or a Python-style
    # list in a string, as in Qwen2.5-Math's evaluation files)
    answer_format: AnswerFormat = AnswerFormat.answer
    on_bad_row: OnBadRow = OnBadRow.error
    arith: ArithConfig = field(default_factory=ArithConfig)


@dataclass
class RewardTermConfig:
    name: str = "accuracy"  # accuracy | format | an own function's import path, package.module:function
    weight: float = 1.0


@dataclass
class RewardConfig:
    name: str = "accuracy"
    terms: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    # how the terms make advantages: sum_then_normalize (the weighted sum, then grpo.adv_estimator) |
    # normalize_then_sum (GDPO: each term normalised within its group, the weighted sum normalised over the batch)
    multi_objective_aggregation: MultiObjectiveAggregation = MultiObjectiveAggregation.sum_then_normalize
    timeout_s: float = 2.0
    last_number_fallback: bool = False
    format_style: FormatStyle = FormatStyle.boxed
    # the random term's chance of reward 1 (reward=random: the spurious-rewards control)
    random_probability: float = 0.5
    # DAPO's soft overlong punishment, per layer: a completion longer than its layer's budget minus
    # overlong_buffer_len tokens loses up to overlong_penalty_factor, linearly to the budget; null = off
    overlong_buffer_len: Optional[int] = None
    overlong_penalty_factor: float = 1.0


GUIDING_PHRASES = [
    "Where might I have gone wrong this time? Let me double-check carefully.",
    "Wait, let me double-check that.",
    "Wait a minute, let me make sure I didn't make a mistake.",
    "Hmm, let me think if there's another way to approach this problem.",
    "Wait, maybe I can think about it like this:",
    "Another thought: maybe I can...",
    "But wait, let me make sure I didn't miss anything in the original problem.",
]


@dataclass
class LayerConfig:
    name: str = "mgrpo"
    depth: int = 2  # 1 = GRPO; 2 = MGRPO (the paper); k >= 3 chains further corrections
    input_mode: InputMode = InputMode["continue"]
    select: Select = Select.sample
    k: int = 2  # responses per query sent on when select == sample
    group_size: int = 4  # H
    reward: L2Reward = L2Reward.correct
    improvement_bonus: float = 1.0
    keep: Keep = Keep.all
    combine: Combine = Combine.sum
    weight: float = 1.0  # lambda
    # corrections' new-token budget; null = model.max_correction_length, else model.max_completion_length
    max_new_tokens: Optional[int] = None
    phrases: list[str] = field(default_factory=lambda: list(GUIDING_PHRASES))
    eval_phrase: str = "Wait, let me double-check that."
    phrase_template: str = "\n{phrase}\n"
    new_turn_prompt: str = "Review your previous answer. {phrase} Then give your final answer within \\boxed{{}}."


@dataclass
class GRPOConfig:
    num_generations: int = 8  # G
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample from the k most likely tokens; 0 = all
    min_p: Optional[float] = None  # drop tokens below min_p x the most likely token's probability; null = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or completion; 1 = off
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    # the paper's per-sequence mean (TRL's default is dapo); cispo caps the weight at epsilon_high (set it, e.g. 5.0)
    loss_type: LossType = LossType.grpo
    sapo_temperature_pos: float = 1.0  # SAPO's gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # and where A <= 0
    vespo_k_pos: float = 2.0  # VESPO's Gamma weight exp(lambda + k log w - lambda w), A >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # and A < 0
    vespo_lambda_neg: float = 2.0
    # grpo: (r - group mean) / group std (scale_rewards) | rloo: leave-one-out baseline |
    # reinforce_plus_plus_baseline: r - group mean, whitened over the batch's tokens (verl)
    adv_estimator: AdvEstimator = AdvEstimator.grpo
    scale_rewards: ScaleRewards = ScaleRewards.group
    std_eps: float = 1e-4
    lr: float = 1e-4  # the embedded task: 3e-4 lost ~10 points early from one warm start (docs/benchmarks.md)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 65536
    # mu: optimizer steps per rollout (each a pass over every layer's batch, against the log-probs
    # stored before the first); 1 = one update per rollout, pi_old = pi_theta.detach()
    num_iterations: int = 1
    # DAPO's overlong filtering: completions cut off by the token budget (no EOS) leave the loss
    mask_truncated_completions: bool = False
    # token: a ratio per token (GRPO); sequence: one length-normalised ratio per completion (GSPO)
    importance_sampling_level: ImportanceSamplingLevel = ImportanceSamplingLevel.token
    # INTELLECT-2's two-sided clipping: the ratio is also capped at delta (> 1 + epsilon_high); null = off
    delta: Optional[float] = None
    # train only on this top share of completion tokens by entropy (over each layer's batch); 1.0 = all
    top_entropy_quantile: float = 1.0
    # entropy bonus: the loss minus entropy_coef x each layer's mean token entropy; 0 = off
    entropy_coef: float = 0.0
    # Skywork-OR1: per layer, the coefficient grows by entropy_coef_delta (up to entropy_coef_max) after a step
    # whose entropy was at or below entropy_target, else shrinks (down to entropy_coef_min); applied only then
    use_adaptive_entropy: bool = False
    entropy_target: Optional[float] = None  # nats; required with use_adaptive_entropy
    entropy_coef_delta: float = 0.005
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    # TR-DPO: every ref_model_sync_steps optimizer steps the KL reference becomes alpha x policy + (1 - alpha) x itself
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # DeepSeek-V3.2: drop negative-advantage completions whose mean log(pi_old / pi_theta) exceeds this; null = off
    off_policy_mask_threshold: Optional[float] = None
    # DeepSeek-V3.2: the KL term times the importance ratio (unbiased under pi_old's samples)
    use_bias_correction_kl: bool = False
    # ScaleRL: no dropout in the policy (and reference), so log-probs are deterministic; an fp32 lm_head
    disable_dropout: bool = False
    cast_lm_head_to_fp32: bool = False
    # DAPO's dynamic sampling, per layer: groups whose rewards are all equal are dropped and more
    # inputs drawn until the layer's batch is full or max_sampling_rounds rollouts were made
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # importance sampling against the sampler/trainer gap (pi_old / pi_sampler per token or sequence,
    # capped at rollout_is_cap: truncated, or masked to 0 above it); null = off (the gap is logged either way)
    rollout_is: Optional[RolloutIS] = None
    rollout_is_cap: float = 2.0


@dataclass
class WarmupConfig:
    enabled: bool = True
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    eval_every: int = 10  # accuracy jumps within a few dozen steps: check often
    # stop at the first check whose accuracy reaches this (the band where GRPO has most to learn)
    target_accuracy: float = 0.4
    correction_share: float = 0.3
    cache_dir: str = "${paths.outputs}/warmstart"
    only: bool = False  # stop after the warm start (to make or refresh it)
    # the warm-up's own seed: every run seed starts from the same warm start (the shipped one by default)
    seed: int = 0
    # the arith task the warm-up trains on: dataset = the run's dataset.arith; default = the default
    # task (its warm start ships), so a harder variant starts from a model made for easier problems
    task: WarmupTask = WarmupTask.dataset


@dataclass
class TrainerConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 300
    max_time: Optional[str] = None  # "DD:HH:MM:SS"
    val_every: int = 50
    # validate the held-out set before the first training step (verl's name; step 0 of the held-out files)
    val_before_train: bool = True
    # a val/* metric (val/acc_t2, val/pass@4, ...): keep the save_top_k best validations as
    # checkpoints/best-step=<step>.ckpt (and export the best to export-best/); null = none
    monitor: Optional[str] = None
    monitor_mode: MonitorMode = MonitorMode.max  # max | min: which way is better
    save_top_k: int = 1
    # stop (FINISHED, the reason in status.json and MLflow) after this many validations in a row without a
    # strict improvement of the monitored metric; null = never
    early_stop_patience: Optional[int] = None
    threads: Optional[int] = None  # torch.set_num_threads; null = leave as is
    # torch.use_deterministic_algorithms (Lightning's Trainer(deterministic=True)): bit-exact resume on GPU,
    # at the cost of slower deterministic kernels (docs/resume.md); CPU runs are exact without it
    deterministic: bool = False
    checkpoint_every: int = 100
    # step checkpoints kept: last.ckpt, last-1.ckpt, ...; resume= uses the newest that loads
    keep_checkpoints: int = 2
    # also write checkpoints/last.ckpt after any step ending this many minutes after the last checkpoint
    checkpoint_every_minutes: Optional[float] = None
    # stop after this many training steps in a row whose loss or gradient was not finite (0 = never)
    max_nonfinite_steps: int = 3
    deepspeed_stage: Optional[int] = None  # 2 | 3 (trainer=deepspeed)
    # write sha256 checksums of the policy's weights per rank to <run>/checksums/rank<k>.json at the end
    weight_checksums: bool = False


@dataclass
class LoggerConfig:
    name: str = "mlflow"
    enabled: bool = True
    tracking_uri: Optional[str] = None  # null = sqlite:///<paths.outputs>/mlflow.db
    experiment: str = "mgrpo"
    samples_every: int = 50
    samples_n: int = 16
    # copy the exported model into the run's artifacts (export/); false for big models
    log_export: bool = True


@dataclass
class LoraConfig:
    name: str = "none"
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # merged: LoRA folded into the weights | adapter: the adapter alone (loads on top of its base model)
    export: LoraExport = LoraExport.merged


@dataclass
class EvalConfig:
    split: str = "test"
    limit: Optional[int] = None
    batch_size: int = 64
    n: int = 1  # samples per problem; 1 = greedy (validation during training and mgrpo eval alike)
    temperature: float = 1.0  # the samples' temperature when n > 1
    two_pass: bool = True
    max_new_tokens: Optional[int] = None


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    # the data folder: <dataset name>/<split>.jsonl is read from here, and a split loaded from the Hub is
    # written here on first use; $MGRPO_DATA_DIR, else ~/.cache/mgrpo/data
    data: str = f"${{oc.env:{DATA_DIR_ENV},'{DEFAULT_DATA_DIR}'}}"


@dataclass
class TrainAppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    layer: LayerConfig = field(default_factory=LayerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 0
    # start from this Lightning checkpoint (weights, optimizer, step) as a new run
    ckpt_path: Optional[str] = None
    # continue the run in this folder (its saved config, last checkpoint and MLflow run; docs/resume.md)
    resume: Optional[str] = None
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class EvalAppConfig(TrainAppConfig):
    task_name: str = "eval"
    # re-grade a saved per-problem JSONL instead of generating
    rescore: Optional[str] = None
    # a Lightning checkpoint to load the policy from (model.path may point to an export folder instead)
    checkpoint: Optional[str] = None
    # save_pretrained the loaded policy (e.g. from `checkpoint`) into this folder and stop (no scoring)
    export_to: Optional[str] = None


def register_configs() -> None:
    """Register ``train_schema``/``eval_schema``: they type every group's subtree (model, layer, …)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainAppConfig)
    cs.store(name="eval_schema", node=EvalAppConfig)
