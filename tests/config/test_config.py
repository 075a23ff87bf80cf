"""Every option of every config group composes and builds; bad values fail at compose time."""
from pathlib import Path

import pytest
from conftest import ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

GROUPS = ["model", "dataset", "reward", "layer", "trainer", "logger", "lora", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(config_name, group):
    from mgrpo_cli.config.schema import EvalAppConfig, TrainAppConfig

    names = options(group)
    if config_name == "eval" and group == "experiment":
        pytest.skip("experiments are training recipes")
    assert names, f"conf/{group} is empty"
    for name in names:
        cfg = compose(config_name, [f"{group}={name}"])
        obj = OmegaConf.to_object(cfg)  # every value has the schema's type
        assert isinstance(obj, EvalAppConfig if config_name == "eval" else TrainAppConfig)
        if group in ("model", "dataset", "reward", "layer", "trainer", "logger", "lora"):
            assert cfg[group].name == name, f"conf/{group}/{name}.yaml: name should be {name!r}"


def test_options_build_their_objects():
    from mgrpo_cli.cli import build
    from mgrpo_cli.data.loaders import data_folder_file, load_problems
    from mgrpo_cli.models.tiny import build_byte_tokenizer
    from mgrpo_cli.rollout.prompts import PromptRenderer

    for name in options("reward"):
        build.reward(compose("train", [f"reward={name}"])).close()
    for name in options("layer"):
        lay = compose("train", [f"layer={name}"]).layer
        PromptRenderer(build_byte_tokenizer(), "plain", "", lay.input_mode, lay.phrase_template, lay.new_turn_prompt)
        assert lay.depth >= 1 and len(lay.phrases) == 7
    for name in options("dataset"):
        ds = compose("train", [f"dataset={name}"]).dataset
        if ds.kind == "arith" or data_folder_file(None, ds.name, "test"):  # the data folder: MGRPO_DATA_DIR
            assert len(load_problems(build.dataset_spec(ds), "test", limit=3).problems) == 3


def test_defaults_are_the_papers_choices():
    cfg = compose("train")
    assert cfg.layer.name == "mgrpo" and cfg.layer.depth == 2
    assert (cfg.layer.input_mode, cfg.layer.select, cfg.layer.k, cfg.layer.group_size) == ("continue", "sample", 2, 4)
    assert (cfg.layer.reward, cfg.layer.keep, cfg.layer.combine, cfg.layer.weight) == ("correct", "all", "sum", 1.0)
    assert (cfg.grpo.num_generations, cfg.grpo.loss_type, cfg.grpo.scale_rewards) == (8, "grpo", "group")
    assert cfg.model.name == "tiny" and cfg.dataset.name == "arith"


@pytest.mark.parametrize("override,needle", [
    ("trainer.max_steps=abc", "max_steps"),
    ("layer.select=smaple", "smaple"),
    ("grpo.epsilonn=0.1", "epsilonn"),
    ("model=nope", "nope"),
])
def test_bad_values_fail_at_compose_time(override, needle):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", [override])
    assert needle in str(e.value) + str(e.value.__cause__)


def test_conf_dir_env_override(monkeypatch, tmp_path):
    from mgrpo_cli.config.schema import conf_dir

    monkeypatch.setenv("MGRPO_CONF_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MGRPO_CONF_DIR"):
        conf_dir()
    monkeypatch.delenv("MGRPO_CONF_DIR")
    assert conf_dir() == Path(ROOT / "conf")


def test_arith_hard_starts_from_the_shipped_warm_start_of_the_default_task():
    from mgrpo_cli.cli.build import warmup_spec
    from mgrpo_cli.training.warmup import SHIPPED, cache_key

    shipped = {p.name for p in SHIPPED.iterdir() if (p / "warmup.json").is_file()}
    hard = compose("train", ["dataset=arith_hard"])
    assert (hard.dataset.arith.min_operands, hard.dataset.arith.max_operands) == (3, 5)
    assert cache_key(warmup_spec(hard)) == cache_key(warmup_spec(compose("train"))) and cache_key(warmup_spec(hard)) in shipped
    # warming up on the run's own task gives another start
    own = compose("train", ["dataset=arith_hard", "warmup.task=dataset"])
    assert cache_key(warmup_spec(own)) != cache_key(warmup_spec(hard))


# the impossible combinations of the 2026 losses, estimators and stabilisers: one line naming the key
BAD_COMBINATIONS = [
    (["grpo.loss_type=luspo"], "grpo.loss_type=luspo: LUSPO scales GSPO's sequence loss"),
    (["grpo.loss_type=vespo", "grpo.importance_sampling_level=sequence"], "grpo.loss_type=vespo: VESPO weighs"),
    (["grpo.loss_type=cispo"], "grpo.epsilon_high=None: loss_type=cispo caps the importance weight"),
    (["grpo.loss_type=sapo", "grpo.delta=1.5"], "grpo.delta=1.5: delta caps the clipped ratio"),
    (["grpo.adv_estimator=rloo", "grpo.scale_rewards=batch"], "grpo.scale_rewards=batch: scales the grpo"),
    (["grpo.adv_estimator=rloo", "reward.multi_objective_aggregation=normalize_then_sum"],
     "reward.multi_objective_aggregation=normalize_then_sum: GDPO"),
    (["grpo.use_adaptive_entropy=true"], "grpo.entropy_target=None: use_adaptive_entropy steers"),
    (["grpo.entropy_target=0.5"], "grpo.entropy_target=0.5: only the adaptive entropy control reads it"),
    (["grpo.entropy_coef_min=0.5", "grpo.entropy_coef_max=0.1"], "grpo.entropy_coef_min=0.5: the floor"),
    (["grpo.entropy_coef=-0.1"], "grpo.entropy_coef=-0.1"),
    (["grpo.use_bias_correction_kl=true"], "grpo.use_bias_correction_kl=True: corrects the KL term"),
    (["grpo.off_policy_mask_threshold=0.5"], "grpo.off_policy_mask_threshold=0.5: with num_iterations=1"),
    (["grpo.off_policy_mask_threshold=-1", "grpo.num_iterations=2"], "grpo.off_policy_mask_threshold=-1"),
    (["grpo.sync_ref_model=true"], "grpo.sync_ref_model=True: moves the KL reference, and grpo.beta=0"),
    (["grpo.sync_ref_model=true", "grpo.beta=0.1", "lora=default"], "grpo.sync_ref_model=True: with LoRA"),
    (["grpo.sync_ref_model=true", "grpo.beta=0.1", "trainer=fsdp"], "grpo.sync_ref_model=True: under trainer=fsdp"),
    (["grpo.ref_model_mixup_alpha=1.5"], "grpo.ref_model_mixup_alpha=1.5: the reference moves alpha"),
    (["grpo.ref_model_mixup_alpha=0"], "grpo.ref_model_mixup_alpha=0"),
    (["grpo.ref_model_sync_steps=0"], "grpo.ref_model_sync_steps=0"),
    (["grpo.top_k=-1"], "grpo.top_k=-1"),
    (["grpo.min_p=1.5"], "grpo.min_p=1.5"),
    (["grpo.repetition_penalty=0"], "grpo.repetition_penalty=0"),
    (["grpo.sapo_temperature_neg=0"], "grpo.sapo_temperature_neg=0"),
    (["grpo.vespo_lambda_pos=0"], "grpo.vespo_lambda_pos=0"),
    (["grpo.vespo_k_neg=-1"], "grpo.vespo_k_neg=-1"),
    (["reward=random", "reward.random_probability=1.5"], "reward.random_probability=1.5: the random reward's"),
    (["reward.overlong_buffer_len=0"], "reward.overlong_buffer_len=0: the overlong buffer is the last N >= 1"),
    (["reward.overlong_buffer_len=32"], "reward.overlong_buffer_len=32: the buffer must be shorter than each "
     "layer's token budget (model.max_completion_length = 32)"),
    (["reward.overlong_buffer_len=16", "model.max_correction_length=16"],
     "reward.overlong_buffer_len=16: the buffer must be shorter than each layer's token budget (the correction"),
    (["reward.overlong_penalty_factor=-1"], "reward.overlong_penalty_factor=-1"),
    (["grpo.rollout_is=token_mask", "grpo.rollout_is_cap=0.5"], "grpo.rollout_is_cap=0.5: the importance weights' cap"),
    (["model.rollout_dtype=bfloat16", "model.dtype=bfloat16"], "model.rollout_dtype=bfloat16: samples a float32 model "
     "in lower precision, and this one trains in model.dtype=bfloat16 with trainer.precision=32-true"),
    (["model.rollout_dtype=float16", "trainer.precision=bf16-mixed"], "model.rollout_dtype=float16: samples a float32"),
    (["trainer.early_stop_patience=3"], "trainer.early_stop_patience=3: stops when the monitored metric stops "
     "improving: set trainer.monitor"),
    (["trainer.monitor=val/pass@4"], "trainer.monitor=val/pass@4: validation (eval.n=1, eval.two_pass=True) logs "
     "val/acc_t1, val/acc_t2"),
    (["trainer.monitor=acc_t2", "eval.n=4"], "trainer.monitor=acc_t2: validation (eval.n=4, eval.two_pass=True) "
     "logs val/acc_t1, val/mean@4, val/pass@1, val/pass@2, val/pass@4, val/maj@4, val/acc_t2"),
    (["trainer.monitor=val/acc_t2", "trainer.early_stop_patience=0"], "trainer.early_stop_patience=0"),
    (["trainer.save_top_k=-1"], "trainer.save_top_k=-1: keep N >= 0 best checkpoints"),
    (["eval.n=4", "eval.temperature=0"], "eval.temperature=0.0: eval.n=4 samples per problem need a temperature > 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_COMBINATIONS, ids=[" ".join(o) for o, _ in BAD_COMBINATIONS])
def test_impossible_loss_combinations_are_one_line_errors(tmp_path, overrides, message):
    from mgrpo_cli.config import rules
    from mgrpo_cli.errors import UserError

    cfg = compose("train", [f"paths.outputs={tmp_path}", *overrides])
    with pytest.raises(UserError) as err:
        rules.check(cfg)
    text = str(err.value)
    assert "\n" not in text and message in text, text


def test_closed_sets_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose("train", ["grpo.loss_type=ppo"])
    with pytest.raises(ConfigCompositionException):
        compose("train", ["grpo.adv_estimator=gae"])
    with pytest.raises(ConfigCompositionException):
        compose("train", ["reward.multi_objective_aggregation=mean"])


def test_the_rules_know_which_losses_clip_from_the_loss_registry(tmp_path):
    """``grpo.delta`` caps PPO's clipped ratio: the rules allow it for exactly the registry's clipped
    loss types, and the registry holds exactly the schema's loss types."""
    from mgrpo_cli.algo.grpo import LOSS_TYPES
    from mgrpo_cli.config import rules
    from mgrpo_cli.config.schema import LossType
    from mgrpo_cli.errors import UserError

    assert set(LOSS_TYPES) == {t.value for t in LossType}
    for name, kind in LOSS_TYPES.items():
        level = "sequence" if name == "luspo" else "token"
        cfg = compose("train", [f"paths.outputs={tmp_path}", f"grpo.loss_type={name}", "grpo.delta=10.0",
                                "grpo.epsilon_high=0.5" if name != "cispo" else "grpo.epsilon_high=5.0",
                                f"grpo.importance_sampling_level={level}"])
        if kind.clipped:
            rules.check(cfg)
        else:
            with pytest.raises(UserError, match="delta caps the clipped ratio"):
                rules.check(cfg)
