"""One real training_step on the tiny model: MGRPO (depth 2), a depth-3 chain, and GRPO."""
import lightning as L
import pytest
import torch

from mgrpo_cli import build
from mgrpo_cli.modeling import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rewards import Grader, Scored

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ParityReward:
    """A test double with real variance on a random model: 1 when the first character's code is even."""

    def __init__(self):
        self.grader = Grader()
        self.calls = []

    def __call__(self, completions, golds, **fields):
        self.calls.append(len(completions))
        ok = [bool(c) and ord(c[0]) % 2 == 0 for c in completions]
        return Scored(rewards=[float(x) for x in ok], correct=ok)


def _module(cfg, reward):
    """The module of ``cfg`` on a random tiny model, built as mgrpo train builds it, and its train loader."""
    tok = build_byte_tokenizer()
    module = build.module(cfg, build_tiny_model(cfg.model, tok, seed=0), tok, reward)
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
    assert metrics["train/layer1/kl"] > -1e-6 and "train/layer2/loss" in metrics  # k3 >= 0 up to rounding
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)) for v in metrics.values())


def test_bf16_true_keeps_the_rotary_frequencies_in_float32(small_cfg):
    """Lightning's bf16-true casts the whole module; the rotary inverse frequencies go back to float32
    (bf16 would move a rotation angle by up to ~2 radians at position 1000)."""
    cfg = small_cfg("layer=grpo", "model.max_completion_length=4")
    want = build_tiny_model(cfg.model, build_byte_tokenizer(), seed=0).model.rotary_emb.inv_freq
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
    policy, ref = module.policy, module._reference[0]
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    # global_step counts optimizer steps: two per training step here, so 4 steps = 2 training steps
    assert trainer.global_step == 4 and reward.calls == [8, 8, 8, 8]
    assert all(not p.requires_grad for p in ref.parameters())
    assert not torch.equal(next(ref.parameters()).cpu(), next(policy.parameters()).cpu())  # fit ends on the CPU
    assert trainer.callback_metrics["train/layer1/kl"] >= 0.0


def test_corrections_get_their_own_token_budget(small_cfg):
    """model.max_completion_length bounds layer 1; model.max_correction_length (or layer.max_new_tokens) layers 2+."""
    from mgrpo_cli.build import correction_budget

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
