"""One real training_step on the tiny model: MGRPO (depth 2), a depth-3 chain, and GRPO."""

import lightning as L
import pytest
import torch

from mgrpo_cli.cli import build
from mgrpo_cli.config import rules
from mgrpo_cli.grading.grader import Grader
from mgrpo_cli.grading.rewards import Scored
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ParityReward:
    """A test double with real variance on a random model: 1 when the first character's code is even."""

    def __init__(self):
        self.grader = Grader(timeout_s=2.0, last_number_fallback=False)
        self.calls = []

    def reseed(self, seed):  # draws nothing at random
        pass

    def __call__(self, completions, golds, **fields):
        self.calls.append(len(completions))
        ok = [bool(c) and ord(c[0]) % 2 == 0 for c in completions]
        return Scored(rewards=[float(x) for x in ok], correct=ok)


def _module(cfg, reward):
    """The module of ``cfg`` on a random tiny model, built as mgrpo train builds it, and its train loader."""
    tok = build_byte_tokenizer()
    module = build.module(cfg, build_tiny_model(build.model_spec(cfg.model), tok, seed=0), tok, reward)
    return module, build.train_loader(build.problem_stream(cfg), module)


def _fit_one_step(cfg, on_rollout=None, **trainer_kw):
    """One training step under a Lightning Trainer (``trainer_kw``: accelerator, precision, ...); a
    frozen KL reference when ``grpo.beta`` > 0; ``on_rollout(rollout, policy)`` sees every layer's rollout."""
    reward = ParityReward()
    module, train_dl = _module(cfg, reward)
    policy = module.policy
    if on_rollout is not None:
        generate = module.engine.generate

        def spy(prompts, **kw):
            ro = generate(prompts, **kw)
            on_rollout(ro, policy)
            return ro

        module.engine.generate = spy
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, train_dataloaders=train_dl)
    # compared in the trained weights' dtype and on the CPU (bf16-true converts them; fit ends on the CPU)
    changed = sum(not torch.equal(before[k].to(v.dtype), v.cpu()) for k, v in policy.state_dict().items())
    reward.grader.close()
    return trainer.callback_metrics, reward.calls, changed


@pytest.mark.parametrize("depth", [2, 3])
def test_mgrpo_step_runs_every_layer_and_changes_weights(small_cfg, depth):
    cfg = small_cfg(f"layer.depth={depth}", "layer.select=all", "grpo.prompts_per_step=2",
                    "grpo.num_generations=4", "layer.group_size=2", "model.max_completion_length=8")
    metrics, calls, changed = _fit_one_step(cfg)
    # layer 1: 2 prompts x 4; layer 2: all 8 responses x 2; layer 3: all 16 x 2
    assert calls == [8, 16, 32][:depth]
    assert changed > 0
    for d in range(1, depth + 1):
        assert f"train/layer{d}/reward_mean" in metrics and f"train/layer{d}/zero_variance_groups" in metrics
    assert "train/layer2/wrong_to_right" in metrics and "train/layer2/right_to_wrong" in metrics


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_mgrpo_step_on_each_device_and_precision_changes_weights(small_cfg, device, precision):
    """The whole step on ``device``: rollouts there, a frozen KL reference moved there, the CPU-made
    advantages and layer-2 keep mask applied to its rollouts; bf16-true is trainer=gpu's default."""
    cfg = small_cfg("layer.select=all", "grpo.prompts_per_step=2", "grpo.num_generations=4", "layer.group_size=2",
                    "model.max_completion_length=8", "grpo.beta=0.1", "layer.keep=successful")
    devices = []
    metrics, calls, changed = _fit_one_step(cfg, on_rollout=lambda ro, _: devices.append(ro.completion_ids.device.type),
                                            accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                                            precision=precision)
    assert devices == [device, device] and calls == [8, 16]
    assert changed > 0
    # step 1: the reference is the policy's copy, so each layer's KL (k3 = e^d - d - 1, d the log-prob
    # difference) is 0 up to rounding: d^2/2 with d at most bf16's 2^-8 relative error of log-probs of
    # size <= 5 in the bf16 modes, float32's 2^-23 in full precision (a reference that differs gives ~0.1)
    tol = 2e-4 if precision.startswith("bf16") else 1e-10
    assert all(0 <= float(metrics[f"train/layer{d}/kl"]) <= tol for d in (1, 2)), metrics
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)) for v in metrics.values())


def test_bf16_true_keeps_the_rotary_frequencies_in_float32(small_cfg):
    """Lightning's bf16-true casts the whole module; the rotary inverse frequencies go back to float32
    (bf16 would move a rotation angle by up to ~2 radians at position 1000)."""
    cfg = small_cfg("layer=grpo", "model.max_completion_length=4")
    want = build_tiny_model(build.model_spec(cfg.model), build_byte_tokenizer(), seed=0).model.rotary_emb.inv_freq
    seen = []

    def at_rollout(ro, policy):  # what the rollout runs with
        rotary = policy.model.rotary_emb
        seen.append((policy.model.embed_tokens.weight.dtype, rotary.inv_freq.dtype,
                     torch.equal(rotary.inv_freq, want), torch.equal(rotary.original_inv_freq, want)))

    _fit_one_step(cfg, on_rollout=at_rollout, precision="bf16-true")
    assert seen == [(torch.bfloat16, torch.float32, True, True)]


def test_grpo_step_is_one_layer(small_cfg):
    metrics, calls, changed = _fit_one_step(small_cfg("layer=grpo", "model.max_completion_length=8"))
    assert calls == [2 * 4] and changed > 0 and "train/layer2/reward_mean" not in metrics


def test_sequential_combine_and_kl_reference(small_cfg):
    cfg = small_cfg("layer.combine=sequential", "grpo.beta=0.1", "model.max_completion_length=8")
    reward = ParityReward()
    module, train_dl = _module(cfg, reward)
    policy, ref = module.policy, module.reference
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    # global_step counts optimizer steps: two per training step here, so 4 steps = 2 training steps
    assert trainer.global_step == 4 and reward.calls == [8, 8, 8, 8]
    assert all(not p.requires_grad for p in ref.parameters())
    assert not torch.equal(next(ref.parameters()).cpu(), next(policy.parameters()).cpu())  # fit ends on the CPU
    assert trainer.callback_metrics["train/layer1/kl"] > 0.0  # the second step's policy has moved from it


def test_corrections_get_their_own_token_budget(small_cfg):
    """model.max_completion_length bounds layer 1; model.max_correction_length (or layer.max_new_tokens) layers 2+."""
    from mgrpo_cli.cli.build import correction_budget

    cfg = small_cfg("layer.depth=3", "layer.select=all", "grpo.prompts_per_step=2", "grpo.num_generations=2",
                    "layer.group_size=2", "model.max_completion_length=4", "model.max_correction_length=9")
    assert correction_budget(cfg) == 9
    module, train_dl = _module(cfg, ParityReward())
    budgets, generate = [], module.engine.generate

    def spy(prompts, **kw):
        budgets.append(kw["max_new_tokens"])
        return generate(prompts, **kw)

    module.engine.generate = spy
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              limit_val_batches=0, enable_model_summary=False).fit(module, train_dataloaders=train_dl)
    assert budgets == [4, 9, 9]
    cfg.layer.max_new_tokens = 6
    assert correction_budget(cfg) == 6
    cfg.layer.max_new_tokens, cfg.model.max_correction_length = None, None
    assert correction_budget(cfg) == 4 and correction_budget(cfg, first_budget=7) == 7


# ---------------------------------------------------------------- the algorithm options, on every layer

OPTIONS = [
    ["grpo.num_iterations=2"],
    ["grpo.mask_truncated_completions=true"],
    ["grpo.importance_sampling_level=sequence", "grpo.epsilon=3e-4", "grpo.epsilon_high=4e-4"],
    ["grpo.delta=1.5", "grpo.num_iterations=2"],
    ["grpo.top_entropy_quantile=0.2"],
    ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3"],
    ["grpo.num_iterations=2", "layer.combine=sequential", "grpo.beta=0.1"],
]


@pytest.mark.parametrize("options", OPTIONS, ids=[" ".join(o) for o in OPTIONS])
def test_each_option_runs_a_step_on_every_layer(small_cfg, options):
    """A debug-size step per option; the per-layer metrics of every layer come out finite."""
    cfg = small_cfg("layer.select=all", "model.max_completion_length=6", *options)
    metrics, calls, changed = _fit_one_step(cfg)
    if "grpo.mask_truncated_completions=true" in options:  # a random model never stops: all cut off, no update
        every_row_cut = all(metrics[f"train/layer{d}/clipped_ratio"] == 1.0 for d in (1, 2))
        assert (changed == 0) == every_row_cut
    else:
        assert changed > 0
    assert len(calls) >= 2
    for depth in (1, 2):
        for key in ("loss", "clip_low", "clip_high", "clip_region", "clipped_ratio", "entropy", "completion_length",
                    "completion_length_min", "completion_length_max", "terminated_length", "num_tokens", "loss_tokens",
                    "num_tokens_computed", "loss_tokens_computed"):
            value = metrics[f"train/layer{depth}/{key}"]
            assert torch.isfinite(torch.as_tensor(float(value))), (depth, key, value)
    if "grpo.dynamic_sampling=true" in options:
        assert 1 <= metrics["train/layer1/sampling_rounds"] <= 3 and 0 <= metrics["train/layer1/kept_share"] <= 1


def test_num_iterations_makes_that_many_optimizer_steps_per_rollout(small_cfg):
    cfg = small_cfg("grpo.num_iterations=3", "model.max_completion_length=6")
    reward = ParityReward()
    module, train_dl = _module(cfg, reward)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    # layer.combine=sum: 3 optimizer steps (each a pass over both layers) for one rollout of each layer
    assert trainer.global_step == 3 and reward.calls == [8, 8] and module.batches_done == 1


class GoldParityReward(ParityReward):
    """Every completion of a problem whose gold answer is even gets 1 (a zero-variance group); the other
    problems' completions the first-character parity. Records the row fields it is given."""

    def __init__(self):
        super().__init__()
        self.fields = []

    def __call__(self, completions, golds, **fields):
        self.calls.append(len(completions))
        self.fields.append(fields)
        ok = [int(g) % 2 == 0 or (bool(c) and ord(c[0]) % 2 == 0) for c, g in zip(completions, golds, strict=True)]
        return Scored(rewards=[float(x) for x in ok], correct=ok)


def test_dynamic_sampling_keeps_zero_variance_groups_out_of_the_loss_and_refills(small_cfg, monkeypatch):
    from mgrpo_cli.training import module as module_mod

    cfg = small_cfg("grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=12", "grpo.prompts_per_step=3",
                    "model.max_completion_length=6", "layer.select=all")
    reward = GoldParityReward()
    module, train_dl = _module(cfg, reward)
    seen = []
    prepare = module_mod.prepare_layer_loss

    def spy(model, rollout, advantages, spec, **kw):
        seen.append((rollout.n, advantages.view(-1, rollout.n).clone()))
        return prepare(model, rollout, advantages, spec, **kw)

    monkeypatch.setattr(module_mod, "prepare_layer_loss", spy)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    metrics = trainer.callback_metrics
    (n1, adv1), (n2, adv2) = seen
    assert (adv1 != 0).any(-1).all() and (adv2 != 0).any(-1).all()  # no zero-variance group reached the loss
    assert adv1.shape[0] == 3  # layer 1 refilled to its 3 groups
    assert metrics["train/layer1/sampling_rounds"] > 1 and metrics["train/layer1/kept_share"] < 1
    assert 1 <= adv2.shape[0] <= 3 * 4  # layer 2: at most its first round's inputs (select=all: 3 x G)
    first = reward.fields[0]
    assert set(first) >= {"question", "id", "solution", "layer", "turns", "operands"}
    assert all(len(v) == len(first["question"]) for v in first.values())
    assert {f["layer"][0] for f in reward.fields} == {1, 2}


def test_refills_are_a_pure_function_of_the_step(small_cfg):
    """A resumed run redraws the same refills: they depend on (seed, step, rank, round) only."""
    from mgrpo_cli.cli import build

    stream, again = build.problem_stream(small_cfg()), build.problem_stream(small_cfg())
    assert [p.question for p in stream.refill(5, 0, 1, 4)] == [p.question for p in again.refill(5, 0, 1, 4)]
    assert stream.refill(5, 0, 1, 4) != stream.refill(5, 0, 2, 4) != stream.batch(5)
    pool = build.problem_stream(small_cfg("dataset=gsm8k", f"dataset.train_path={_gsm8k_rows()}"))
    assert [p.id for p in pool.refill(2, 1, 1, 3)] == [p.id for p in pool.refill(2, 1, 1, 3)]


def _gsm8k_rows():
    import json
    import tempfile

    path = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for i in range(20):
        path.write(json.dumps({"question": f"{i}+1", "answer": f"#### {i + 1}"}) + "\n")
    path.close()
    return path.name


class ScheduledBadReward(ParityReward):
    """ParityReward, except that on the steps in ``inf_steps`` one reward is infinite (so the
    advantages and the loss are NaN), as a buggy reward function could make it."""

    def __init__(self, inf_steps=()):
        super().__init__()
        self.inf_steps = set(inf_steps)

    def __call__(self, completions, golds, **fields):
        scored = super().__call__(completions, golds, **fields)
        if len(self.calls) - 1 in self.inf_steps:
            scored.rewards[0] = float("inf")
        return scored


class _Snapshots(L.Callback):
    """The policy's weights and AdamW's step count after every training step."""

    def __init__(self):
        self.weights, self.adam_steps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})
        state = trainer.optimizers[0].state
        self.adam_steps.append(max((int(s["step"]) for s in state.values()), default=0))


def _fit_with_guard(cfg, reward, steps, nan_grad_steps=()):
    module, train_dl = _module(cfg, reward)
    first = next(module.policy.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("nan")) if module.batches_done in nan_grad_steps else g)
    snaps = _Snapshots()
    snaps.weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})  # before training
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, callbacks=[snaps])
    return module, trainer, train_dl, snaps


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# beta and weight decay: every finite step changes every weight, even when no group has reward variance
GUARDED = ["layer=grpo", "model.max_completion_length=6", "grpo.beta=0.1", "grpo.weight_decay=0.1"]


def test_nonfinite_loss_or_gradient_never_reaches_the_weights(small_cfg):
    cfg = small_cfg(*GUARDED, "trainer.max_nonfinite_steps=3")
    reward = ScheduledBadReward(inf_steps={1})  # step 1: NaN loss; step 2: finite loss, NaN gradient
    module, trainer, train_dl, snaps = _fit_with_guard(cfg, reward, steps=5, nan_grad_steps={2})
    trainer.fit(module, train_dataloaders=train_dl)
    w = snaps.weights  # w[0] before training, w[i + 1] after step i
    assert not _same(w[0], w[1])
    assert _same(w[1], w[2]) and _same(w[2], w[3])  # the two bad steps changed nothing
    assert not _same(w[3], w[4]) and not _same(w[4], w[5]) and all(torch.isfinite(v).all() for v in w[5].values())
    assert snaps.adam_steps == [1, 1, 1, 2, 3]  # nor the optimizer's state
    assert (module.guard.total, module.guard.in_a_row) == (2, 0)
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2.0
    reward.grader.close()


def test_nonfinite_steps_in_a_row_stop_the_run_with_one_line(small_cfg):
    from mgrpo_cli.errors import UserError

    cfg = small_cfg(*GUARDED, "trainer.max_nonfinite_steps=2")
    reward = ScheduledBadReward(inf_steps={1, 2, 3})
    module, trainer, train_dl, snaps = _fit_with_guard(cfg, reward, steps=6)
    with pytest.raises(UserError, match=r"trainer.max_nonfinite_steps=2: the last 2 training steps \(up to step 3\)"):
        trainer.fit(module, train_dataloaders=train_dl)
    assert len(reward.calls) == 3 and module.guard.total == 2
    assert _same(snaps.weights[1], snaps.weights[2]) and snaps.adam_steps == [1, 1]
    reward.grader.close()


# ---------------------------------------------------------------- the 2026 options (issue 24), on every layer

class TermsReward(ParityReward):
    """ParityReward with two terms, as the real reward gives them: parity (weight 1) and a first character
    that is a letter (weight 0.5), so GDPO's per-term normalisation has terms to normalise."""

    def __call__(self, completions, golds, **fields):
        self.calls.append(len(completions))
        ok = [bool(c) and ord(c[0]) % 2 == 0 for c in completions]
        letter = [float(bool(c) and c[0].isalpha()) for c in completions]
        return Scored(rewards=[float(a) + 0.5 * b for a, b in zip(ok, letter, strict=True)], correct=ok,
                      terms=[[float(a), b] for a, b in zip(ok, letter, strict=True)], weights=[1.0, 0.5])


NEW_OPTIONS = [
    ["grpo.loss_type=bnpo", "grpo.micro_batch_tokens=64"],
    ["grpo.loss_type=cispo", "grpo.epsilon_high=5.0", "grpo.num_iterations=2"],
    ["grpo.loss_type=sapo", "grpo.num_iterations=2"],
    ["grpo.loss_type=luspo", "grpo.importance_sampling_level=sequence"],
    ["grpo.loss_type=vespo", "grpo.num_iterations=2"],
    ["grpo.entropy_coef=0.01"],
    ["grpo.use_adaptive_entropy=true", "grpo.entropy_target=9.0", "grpo.entropy_coef=0.01"],
    ["grpo.sync_ref_model=true", "grpo.beta=0.1", "grpo.ref_model_sync_steps=1", "grpo.ref_model_mixup_alpha=0.5"],
    ["grpo.off_policy_mask_threshold=0.0", "grpo.num_iterations=2"],
    ["grpo.use_bias_correction_kl=true", "grpo.beta=0.1", "grpo.num_iterations=2"],
    ["reward.multi_objective_aggregation=normalize_then_sum"],
    ["grpo.disable_dropout=true", "lora=default"],
    ["grpo.cast_lm_head_to_fp32=true"],
    ["grpo.top_k=5", "grpo.min_p=0.05", "grpo.repetition_penalty=1.2"],
    ["grpo.adv_estimator=rloo"],
    ["grpo.adv_estimator=reinforce_plus_plus_baseline"],
]


@pytest.mark.parametrize("layer", ["mgrpo", "grpo"])
@pytest.mark.parametrize("options", NEW_OPTIONS, ids=[" ".join(o) for o in NEW_OPTIONS])
def test_each_2026_option_trains_a_debug_step_on_every_layer(small_cfg, options, layer):
    """A debug-size step per option, with the policy built as mgrpo train builds it (build.policy):
    the weights move and every layer's metrics, the option's own included, come out finite."""
    cfg = small_cfg(f"layer={layer}", "layer.select=all", "model.max_completion_length=6", *options)
    rules.check(cfg)
    reward = TermsReward()
    policy, tok, _ = build.policy(cfg)
    module = build.module(cfg, policy, tok, reward)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = L.Trainer(max_steps=cfg.grpo.num_iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=build.train_loader(build.problem_stream(cfg), module))
    reward.grader.close()
    metrics = trainer.callback_metrics
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    depths = (1, 2) if layer == "mgrpo" else (1,)
    own = {"entropy_coef": "grpo.entropy_coef=0.01" in options,
           "off_policy_masked": "grpo.off_policy_mask_threshold=0.0" in options}
    for depth in depths:
        for key in ("loss", "kl", "clip_region", "entropy", "reward_mean", *(k for k, on in own.items() if on)):
            value = float(metrics[f"train/layer{depth}/{key}"])
            assert torch.isfinite(torch.as_tensor(value)), (depth, key, value)
    if "grpo.sync_ref_model=true" in options:  # synced after each of the run's optimizer steps
        assert float(metrics["train/ref_syncs"]) == trainer.global_step == module.ref_sync.syncs
        ref = module.reference
        assert not any(torch.equal(a, b) for a, b in zip(ref.parameters(), policy.parameters(), strict=True))
    if "grpo.disable_dropout=true" in options:
        assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    if "grpo.cast_lm_head_to_fp32=true" in options:
        assert policy.get_output_embeddings().weight.dtype == torch.float32


def test_adaptive_entropy_and_the_synced_reference_are_steered_and_survive_a_checkpoint(small_cfg):
    """Two steps: the random model's entropy (about ln 260 = 5.6 nats) is below the target 9, so each
    layer's coefficient grows by delta after each step, and the first step applies none (no entropy seen
    yet); the reference moves at every step; a checkpoint restores coefficients and reference."""
    cfg = small_cfg("model.max_completion_length=6", "grpo.use_adaptive_entropy=true", "grpo.entropy_target=9.0",
                    "grpo.entropy_coef=0.01", "grpo.entropy_coef_delta=0.005", "grpo.sync_ref_model=true",
                    "grpo.beta=0.1", "grpo.ref_model_sync_steps=1")
    rules.check(cfg)
    applied = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            applied.append(float(trainer.callback_metrics["train/layer1/entropy_coef"]))

    reward = TermsReward()
    policy, tok, _ = build.policy(cfg)
    module = build.module(cfg, policy, tok, reward)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, callbacks=[Spy()])
    trainer.fit(module, train_dataloaders=build.train_loader(build.problem_stream(cfg), module))
    reward.grader.close()
    assert applied == [0.0, pytest.approx(0.015)]
    assert module.entropy.coefs == {1: pytest.approx(0.02), 2: pytest.approx(0.02)}
    assert module.ref_sync.syncs == 2
    saved = {}
    module.on_save_checkpoint(saved)
    fresh = build.module(cfg, *build.policy(cfg)[:2], reward)
    assert fresh.entropy.coefs[1] == 0.01 and fresh.ref_sync.syncs == 0
    fresh.on_load_checkpoint(saved)
    assert fresh.entropy.coefs == module.entropy.coefs and fresh.entropy.last_entropy == module.entropy.last_entropy
    assert fresh.ref_sync.syncs == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.reference.parameters(), module.reference.parameters(), strict=True))


# ---------------------------------------------------------------- issue 32's options, on every layer

SHAPING_OPTIONS = [
    ["reward=random"],
    ["reward.overlong_buffer_len=2", "reward.overlong_penalty_factor=0.5"],
    ["reward.overlong_buffer_len=2", "grpo.mask_truncated_completions=true"],
    ["model.rollout_dtype=bfloat16"],
    *([f"grpo.rollout_is={mode}", "grpo.rollout_is_cap=1.001", "model.rollout_dtype=bfloat16"]
      for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")),
    ["grpo.rollout_is=token_mask", "grpo.num_iterations=2", "model.rollout_dtype=bfloat16"],
]


@pytest.mark.parametrize("layer", ["mgrpo", "grpo"])
@pytest.mark.parametrize("options", SHAPING_OPTIONS, ids=[" ".join(o) for o in SHAPING_OPTIONS])
def test_issue32_options_train_a_debug_step_on_every_layer(small_cfg, options, layer):
    """A debug-size step with the real reward function (build.reward): the random control rewards
    about half the completions whatever they say; the overlong penalty is logged per layer."""
    cfg = small_cfg(f"layer={layer}", "layer.select=all", "model.max_completion_length=6",
                    "model.max_correction_length=6", *options)
    rules.check(cfg)
    reward = build.reward(cfg)
    module, train_dl = _module(cfg, reward)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    reward.close()
    metrics = trainer.callback_metrics
    for depth in (1, 2) if layer == "mgrpo" else (1,):
        m = {k.rsplit("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(f"train/layer{depth}/")}
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
        if "reward=random" in options:  # a random model is never right, yet some completions are rewarded
            assert m["accuracy"] == 0.0 and 0.0 < m["reward_mean"] < 1.0
        if cfg.reward.overlong_buffer_len is not None:
            # the random model seldom stops: most completions end at the budget (the full penalty), the
            # others 1 or 2 tokens into the 2-token buffer (half or all of it) or before it
            factor = cfg.reward.overlong_penalty_factor
            assert 0 < m["clipped_ratio"] <= m["overlong_share"] <= 1
            assert -factor * m["overlong_share"] <= m["overlong_penalty"] <= -factor * m["clipped_ratio"]
        else:
            assert "overlong_penalty" not in m
        assert m["rollout_logp_abs_diff"] >= 0 and m["rollout_kl"] >= 0 and m["rollout_ratio_max"] > 0
        if cfg.grpo.rollout_is is not None:  # a cap just above 1 that the bf16 gap crosses
            assert 0 <= m["rollout_is_capped"] <= 1
            if cfg.grpo.rollout_is.startswith("token"):
                assert (m["rollout_is_capped"] > 0) == (m["rollout_ratio_max"] > cfg.grpo.rollout_is_cap)
            if cfg.grpo.rollout_is.endswith("truncate"):
                assert 0 < m["rollout_is_mean"] <= cfg.grpo.rollout_is_cap
        else:
            assert "rollout_is_mean" not in m


def test_bf16_sampling_opens_a_gap_that_fp32_sampling_does_not(small_cfg):
    """One step each of the same run sampling in float32 and in bfloat16 (the policy training in float32):
    the sampler's log-probs against the trainer's recomputed ones. float32 sampling differs only by the
    rounding of a cached decode step against a full forward (a few float32 ulps of ~5.6-nat log-probs,
    ~1e-6); bf16 rounds every matmul input to 8 bits of mantissa (2^-9 relative), ~1e-3 nats."""
    gaps = {}
    for dtype in ("null", "bfloat16"):
        cfg = small_cfg("model.max_completion_length=8", f"model.rollout_dtype={dtype}")
        metrics, _, _ = _fit_one_step(cfg)
        gaps[dtype] = {k: float(metrics[f"train/layer1/rollout_{k}"]) for k in ("logp_abs_diff", "kl", "ratio_max")}
    assert gaps["null"]["logp_abs_diff"] < 1e-5 and gaps["null"]["kl"] < 1e-8
    assert abs(gaps["null"]["ratio_max"] - 1) < 1e-4
    assert gaps["bfloat16"]["logp_abs_diff"] > 1e-4 and gaps["bfloat16"]["kl"] > 1e-7
    assert gaps["bfloat16"]["ratio_max"] > 1 + 1e-4


# ---------------------------------------------------------------- validation as mgrpo eval scores (issue 32)

def test_sampled_validation_scores_pass_maj_mean_and_draws_from_the_step(small_cfg):
    """eval.n = 4 samples per held-out problem on the shipped warm start: the val/* metrics are
    mgrpo eval's (reporting.metrics.summarize), the samples are drawn from (seed, step, rank, batch),
    so validating twice at a step draws the same completions, and another step draws others."""
    from mgrpo_cli.training.warmup import SHIPPED

    start = next(p for p in SHIPPED.iterdir() if p.is_dir())
    cfg = small_cfg(f"model.path={start}", "eval.n=4", "eval.limit=8", "eval.batch_size=4")
    rules.check(cfg)
    reward = ParityReward()
    policy, tok, _ = build.policy(cfg)
    module = build.module(cfg, policy, tok, reward)
    texts = []
    generate = module.engine.generate

    def spy(prompts, **kw):
        ro = generate(prompts, **kw)
        texts.append(ro.texts)
        return ro

    module.engine.generate = spy
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = build.val_loader(build.held_out(cfg).problems, 4)  # two batches of problems
    runs = []
    for step in (0, 0, 5):
        module.batches_done, texts[:] = step, []
        trainer.validate(module, val, verbose=False)
        runs.append((dict(module.last_val), list(texts), list(module.val_rows)))
    reward.grader.close()
    metrics, first_texts, rows = runs[0]
    assert runs[1][1] == first_texts and runs[1][0] == metrics  # the same step draws the same
    assert runs[2][1] != first_texts  # another step, other samples
    for key in ("n", "acc_t1", "acc_t2", "delta", "pass@1", "pass@2", "pass@4", "maj@4", "mean@4"):
        assert key in metrics, key
        assert f"val/{key}" in trainer.callback_metrics
    assert metrics["n"] == 8 and metrics["pass@1"] == pytest.approx(metrics["mean@4"], abs=1e-12)
    assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]
    assert 0 < metrics["pass@4"] and metrics["mean@4"] < 1  # the warm start is right sometimes
    assert len(rows) == 8 and metrics["acc_t1"] == sum(r["t1"] for r in rows) / 8  # t1 = the first sample
    assert metrics["acc_t2"] == sum(r["t2"] for r in rows) / 8
