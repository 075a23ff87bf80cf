"""GRPO math on literal tensors with hand-computed values."""
import math

import pytest
import torch

from mgrpo_cli.algo import advantage, grpo
from mgrpo_cli.rollout.engine import truncated_rows

NAN = float("nan")


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv = advantage.group_advantages(r, "group", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s1 = math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1]))
    # group 2: mean 0.25, unbiased std 0.5
    assert torch.allclose(adv[1], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_zero_variance_group_gets_zero_advantage():
    r = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = advantage.group_advantages(r, "group")
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[1], torch.zeros(3))
    assert advantage.zero_variance_share(r) == pytest.approx(2 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_flat_groups_of_any_reward_value_get_exactly_zero(dtype, scale, eps):
    # float32 0.1 x 8: mean(r) != 0.1 in floating point (r - mean was ~7e-5 before the division by eps)
    r = torch.tensor([[0.1] * 8, [1.1] * 8, [0.3, NAN, 0.3, 0.3, NAN, 0.3, 0.3, 0.3],
                      [2.7, NAN, NAN, NAN, NAN, NAN, NAN, NAN], [1.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]],
                     dtype=dtype)
    adv = advantage.group_advantages(r, scale, eps=eps)
    assert adv.dtype == dtype
    assert torch.equal(adv[:4], torch.zeros(4, 8, dtype=dtype))  # exactly 0, never NaN
    # the one group with a spread: mean 0.225, deviations 0.875 and -0.125, unbiased std sqrt(0.125)
    centred = torch.tensor([0.875] + [-0.125] * 7, dtype=torch.float64)
    if scale == "group":
        centred = centred / (0.125 ** 0.5 + eps)
    elif scale == "batch":
        valid = r[~torch.isnan(r)].double()
        centred = centred / (valid.std() + eps)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(adv[4].double(), centred, rtol=tol, atol=tol)


def test_only_flat_groups_with_zero_eps_are_zero_not_nan():
    for scale in ("group", "batch", "none"):
        adv = advantage.group_advantages(torch.tensor([[0.1, 0.1], [0.1, 0.1]]), scale, eps=0.0)
        assert torch.equal(adv, torch.zeros(2, 2))


def test_ungradable_left_out_of_group_statistics():
    r = torch.tensor([[1.0, NAN, 0.0]])
    adv = advantage.group_advantages(r, "group", eps=0.0)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(adv, torch.tensor([[0.5 / s, 0.0, -0.5 / s]]))
    assert advantage.zero_variance_share(torch.tensor([[1.0, NAN, NAN]])) == 1.0


def test_batch_and_no_scaling():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    none = advantage.group_advantages(r, "none")
    assert torch.allclose(none, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    batch = advantage.group_advantages(r, "batch", eps=0.0)
    std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std()
    assert torch.allclose(batch, none / std)
    with pytest.raises(ValueError, match="scale_rewards"):
        advantage.group_advantages(r, "groups")


def test_k3_kl_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.5), math.log(0.4)])
    kl = grpo.k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.0)
    assert kl[1].item() == pytest.approx(2.0 - math.log(2.0) - 1.0)


def test_clipped_surrogate_clips_both_sides():
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    sur = grpo.clipped_surrogate(log_ratio, torch.tensor([1.0]), 0.2, 0.2)
    # A > 0: ratio 1.5 clipped to 1.2; ratio 0.5 not clipped (min picks 0.5); 1.1 inside
    assert torch.allclose(sur.loss, -torch.tensor([[1.2, 0.5, 1.1]]))
    assert sur.high.tolist() == [[True, False, False]] and not sur.low.any()
    assert sur.region.tolist() == [[True, False, False]]
    neg = grpo.clipped_surrogate(log_ratio, torch.tensor([-1.0]), 0.2, 0.2)
    # A < 0: min(-r, -clip(r)) -> 0.5 clipped to 0.8, 1.5 stays
    assert torch.allclose(neg.loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert neg.low.tolist() == [[False, True, False]] and not neg.high.any()


def test_delta_caps_the_ratio_of_negative_advantages_only():
    log_ratio = torch.log(torch.tensor([[3.0, 1.5, 0.5]]))
    # A < 0: without delta the loss grows with the ratio (3.0); delta = 2 caps it there
    neg = grpo.clipped_surrogate(log_ratio, torch.tensor([-2.0]), 0.2, 0.2, delta=2.0)
    assert torch.allclose(neg.loss, torch.tensor([[4.0, 3.0, 1.6]]))
    assert torch.allclose(grpo.clipped_surrogate(log_ratio, torch.tensor([-2.0]), 0.2, 0.2).loss,
                          torch.tensor([[6.0, 3.0, 1.6]]))
    # A > 0: the clip range binds first (1.2 < delta), so delta changes nothing
    pos, plain = (grpo.clipped_surrogate(log_ratio, torch.tensor([1.0]), 0.2, 0.2, delta=d) for d in (2.0, None))
    assert torch.equal(pos.loss, plain.loss)


def test_sequence_ratio_is_exp_of_the_mean_token_log_ratio():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.4, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -3.4], [-0.5, -0.6, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    x = grpo.sequence_log_ratio(logp, old, mask)
    means = [(0.2 - 0.1 + 0.4) / 3, (0.0 + 0.2) / 2]  # padding (row 2, token 3) left out
    assert torch.allclose(torch.exp(x), torch.exp(torch.tensor(means)).unsqueeze(-1).expand(2, 3))
    # stop-gradient form: d x_it / d logp_it' = 1 if t == t' (each token carries its own gradient)
    x[0, 1].backward()
    assert logp.grad.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert grpo.policy_loss("sequence").log_ratio is grpo.sequence_log_ratio
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.policy_loss("tokens")


def test_sequence_level_gradient_is_gspo():
    """Per-sequence token means of the GSPO loss: d/dlogp_t = -exp(s) * A / |y| inside the clip range."""
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    old = torch.tensor([[-1.05, -1.95, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = grpo.policy_loss("sequence")(logp, torch.tensor([2.0]), mask, old_logp=old)
    loss = grpo.sequence_terms(out.loss, mask, "grpo").sum() / grpo.loss_normalizer(mask, "grpo", 3)
    loss.backward()
    s = math.exp((0.05 - 0.05) / 2)
    assert torch.allclose(logp.grad, torch.tensor([[-s * 2.0 / 2, -s * 2.0 / 2, 0.0]]))


def _toy_logp(theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A 'policy' whose logits are the parameter itself: (B, T, V) logits -> (B, T) log-probs of tokens."""
    return torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_one_iteration_with_stored_old_logps_equals_the_detached_ratio():
    """num_iterations = 1: pi_old from a no-grad pass of the same weights gives today's gradient exactly."""
    torch.manual_seed(0)
    theta = torch.randn(3, 4, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.5, -0.5, 0.7])
    grads = []
    for stored in (False, True):
        with torch.no_grad():
            old = _toy_logp(theta, tokens) if stored else None
        theta.grad = None
        out = grpo.policy_loss()(_toy_logp(theta, tokens), adv, mask, old_logp=old)
        (grpo.sequence_terms(out.loss, mask, "grpo").sum() / 3).backward()
        grads.append(theta.grad.clone())
        assert not out.low.any() and not out.high.any()
    assert torch.equal(grads[0], grads[1])


def test_second_iteration_clips():
    """num_iterations = 2: the first pass moves the policy (ratio 1 -> 1.76 for A > 0), so the second
    pass is clipped at 1 + eps and gives no gradient."""
    theta = torch.zeros(1, 1, 2, requires_grad=True)  # p(token 0) = 0.5
    tokens, mask, adv = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.tensor([1.0])
    loss_fn = grpo.policy_loss(epsilon=0.2)
    with torch.no_grad():
        old = _toy_logp(theta, tokens)
    seen = []
    for _ in range(2):
        theta.grad = None
        out = loss_fn(_toy_logp(theta, tokens), adv, mask, old_logp=old)
        out.loss.sum().backward()
        seen.append((out.loss.item(), out.high.item(), theta.grad.clone()))
        with torch.no_grad():
            theta -= 2.0 * theta.grad  # SGD, lr 2
    (loss1, high1, grad1), (loss2, high2, grad2) = seen
    # pass 1: ratio 1, d(-ratio)/dtheta = -(1 - p, -p) = (-0.5, 0.5)
    assert loss1 == pytest.approx(-1.0) and not high1 and torch.allclose(grad1, torch.tensor([[[-0.5, 0.5]]]))
    # pass 2: theta = (1, -1), p = sigmoid(2) = 0.881, ratio 1.76 > 1.2: clipped, flat
    assert loss2 == pytest.approx(-1.2) and high2 and torch.equal(grad2, torch.zeros(1, 1, 2))


def test_truncated_row_adds_nothing_to_the_loss():
    eos = 9
    ids = torch.tensor([[3, 9, 0], [4, 5, 6], [7, 8, 9], [1, 0, 0]])  # budget 3: row 1 ran out, row 2 ended on EOS
    cmask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    truncated = truncated_rows(ids, cmask, eos)
    assert truncated.tolist() == [False, True, False, True]  # row 3: one token, no EOS
    assert not truncated_rows(ids[:, :0], cmask[:, :0], eos).any()  # empty rows
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    mask = cmask.float() * (~truncated).float().unsqueeze(-1)
    out = grpo.policy_loss()(logp, adv, mask)
    terms = grpo.sequence_terms(out.loss, mask, "grpo")
    assert terms.tolist() == [-1.0, 0.0, -0.5, 0.0]
    terms.sum().backward()
    assert logp.grad[1].abs().sum() == 0 and logp.grad[3].abs().sum() == 0 and logp.grad[0].abs().sum() > 0


def test_token_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert torch.allclose(grpo.token_entropy(logits), torch.tensor([[math.log(4), 0.0]]), atol=1e-6)
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 7) * 3
    p = torch.softmax(logits, -1)
    want = -(p * p.log()).sum(-1)
    assert torch.allclose(grpo.token_entropy(logits, chunk_rows=2), want, atol=1e-5)
    half = grpo.token_entropy(logits.bfloat16())
    assert half.dtype == torch.float32 and torch.allclose(half, want, atol=5e-2)


def test_top_entropy_mask_keeps_the_batch_quantile():
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 5.0 is padding: not in the quantile, not kept
    # the 0.6-quantile of (0.1, 0.3, 0.5, 0.7, 0.9) is 0.58: the top 40% are 0.7 and 0.9
    assert grpo.top_entropy_mask(ent, mask, 0.4).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert torch.equal(grpo.top_entropy_mask(ent, mask, 1.0), mask)
    # the mask multiplies the policy term; the KL term stays on every token
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    out = grpo.policy_loss(beta=0.5)(logp, torch.tensor([1.0, 1.0]), mask,
                                     ref_logp=logp - 1.0, token_mask=grpo.top_entropy_mask(ent, mask, 0.4))
    kl = math.exp(-1.0) + 1.0 - 1.0
    assert torch.allclose(out.loss, torch.tensor([[0.5 * kl, 0.5 * kl, -1 + 0.5 * kl], [0.5 * kl, -1 + 0.5 * kl, 0.5 * kl]]))


def test_length_stats():
    stats = grpo.length_stats(torch.tensor([3, 8, 5, 8]), torch.tensor([False, True, False, True]))
    assert stats == {"completion_length": 6.0, "completion_length_min": 3.0, "completion_length_max": 8.0,
                     "terminated_length": 4.0, "clipped_ratio": 0.5}
    assert grpo.length_stats(torch.tensor([8]), torch.tensor([True]))["terminated_length"] == 0.0


def test_varied_groups():
    r = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, NAN, NAN], [1.0, NAN, 0.0]])
    assert advantage.varied_groups(r).tolist() == [False, True, False, True]


def test_loss_aggregation_variants_on_masks():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    grpo_terms = grpo.sequence_terms(per_token, mask, "grpo")
    assert grpo_terms.tolist() == [2.0, 4.0]
    assert grpo_terms.sum() / grpo.loss_normalizer(mask, "grpo", 3) == pytest.approx(3.0)
    dapo = grpo.sequence_terms(per_token, mask, "dapo").sum() / grpo.loss_normalizer(mask, "dapo", 3)
    assert dapo.item() == pytest.approx(10.0 / 4.0)
    dr = grpo.sequence_terms(per_token, mask, "dr_grpo").sum() / grpo.loss_normalizer(mask, "dr_grpo", 5)
    assert dr.item() == pytest.approx(10.0 / 10.0)
    from mgrpo_cli.config.schema import AdvEstimator, LossType

    assert set(grpo.LOSS_TYPES) == {t.value for t in LossType}  # the schema's closed sets
    assert set(advantage.ADV_ESTIMATORS) == {e.value for e in AdvEstimator}


def _batch_loss(logp, adv, mask, **kw):
    """The whole batch's token-level GRPO loss: the policy term per token, aggregated as grpo."""
    per_token = grpo.policy_loss(**kw)(logp, adv, mask, **{k: v for k, v in kw.items() if k == "ref_logp"}).loss
    return grpo.sequence_terms(per_token, mask, "grpo").sum() / grpo.loss_normalizer(mask, "grpo", mask.shape[1])


def test_grpo_loss_gradient_is_policy_gradient():
    # one update per rollout: ratio = 1, so dL/dlogp_t = -A / |o| for each valid token (grpo aggregation)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = _batch_loss(logp, adv, mask)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2], [1.0 / 1 / 2, 0.0]])
    assert torch.allclose(logp.grad, expected)
    assert loss.item() == pytest.approx(-(2.0 + -1.0) / 2)


def test_kl_term_enters_loss_only_with_beta():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-2.0]])
    mask = torch.ones(1, 1)
    adv = torch.zeros(1)
    def loss(beta):
        per_token = grpo.policy_loss(beta=beta)(logp, adv, mask, ref_logp=ref).loss
        return (grpo.sequence_terms(per_token, mask, "grpo").sum() / grpo.loss_normalizer(mask, "grpo", 1)).item()

    assert loss(0.0) == pytest.approx(0.0)
    kl = math.exp(-1.0) + 1.0 - 1.0
    assert loss(0.1) == pytest.approx(0.1 * kl)


def test_selective_log_softmax_matches_full_and_half_precision():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    idx = torch.randint(0, 11, (2, 3))
    full = torch.log_softmax(logits, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grpo.selective_log_softmax(logits, idx), full, atol=1e-6)
    half = grpo.selective_log_softmax(logits.bfloat16(), idx)
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=5e-2)


def test_chunked_log_softmax_by_hand():
    """Two tokens, vocabulary 3: logits [[1, 0, 0], [0, 2, 0]] at temperature 1, targets 0 and 2."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], requires_grad=True)
    got = grpo.chunked_selective_log_softmax(hidden, weight, torch.tensor([0, 2]), chunk_tokens=1)
    want = [1 - math.log(math.e + 2), -math.log(2 + math.exp(2))]
    assert torch.allclose(got, torch.tensor(want))
    got.sum().backward()
    # token 0: d/d logits = onehot(0) - softmax = [1 - e/(e+2), -1/(e+2), -1/(e+2)]; d logits / d hidden = weight
    p0 = torch.tensor([math.e, 1.0, 1.0]) / (math.e + 2)
    assert torch.allclose(hidden.grad[0], (torch.tensor([1.0, 0, 0]) - p0) @ weight.detach())


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_softmax_equals_the_whole_logits_path(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 11, (2, 4), generator=g)
    grad_out = torch.randn(2, 4, generator=g, dtype=torch.float64)
    got = grpo.chunked_selective_log_softmax(hidden, weight, index, temperature, chunk_tokens=chunk)
    want = grpo.selective_log_softmax(hidden @ weight.T / temperature, index)
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
    g_got = torch.autograd.grad(got, (hidden, weight), grad_out)
    g_want = torch.autograd.grad(want, (hidden, weight), grad_out)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_got, g_want, strict=True))


def test_chunked_log_softmax_passes_gradcheck_and_skips_a_frozen_weight():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (5,), generator=g)

    assert torch.autograd.gradcheck(lambda h, w: grpo._ChunkedLinearLogProb.apply(h, w, index, 1 / 0.7, 2, True)[0],
                                    (hidden, weight))
    frozen = weight.detach()
    out = grpo.chunked_selective_log_softmax(hidden, frozen, index, chunk_tokens=2)
    (gh,) = torch.autograd.grad(out.sum(), hidden)
    want = grpo.selective_log_softmax(hidden @ frozen.T, index)
    assert torch.allclose(gh, torch.autograd.grad(want.sum(), hidden)[0], atol=1e-6)


def _qwen2(vocab: int, seed: int, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(dtype)


@pytest.mark.parametrize("vocab", [260, 32000])  # the tiny model's byte vocabulary, and a larger one
def test_chunked_log_softmax_through_a_model_gives_its_log_probs_and_gradients(vocab):
    """Hidden states of a random-init Qwen2 (tied embeddings: the lm_head gradient lands on the embedding),
    through the chunked path and through lm_head + the whole logits: equal log-probs and parameter gradients.
    In float64: the two paths sum in different orders, and float32 rounding of those orders depends on the
    CPU's kernels; the float64 bound (terms x eps64 x magnitude, terms = the vocabulary + the hidden size +
    the tokens) is far below what a wrong term would change."""
    model = _qwen2(vocab, seed=0, dtype=torch.float64)
    ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(3, 19, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # advantages x mask
    params = list(model.parameters())
    results = []
    for chunked in (True, False):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]  # position t predicts token t + 1
        if chunked:
            logps = grpo.chunked_selective_log_softmax(hidden, model.lm_head.weight, ids[:, 1:], 0.7, chunk_tokens=8)
        else:
            logps = grpo.selective_log_softmax(model.lm_head(hidden) / 0.7, ids[:, 1:])
        results.append((logps, torch.autograd.grad((logps * weights).sum(), params)))
    (got, g_got), (want, g_want) = results
    assert got.dtype == torch.float64
    eps_bound = 10 * (vocab + 64 + ids[:, 1:].numel()) * torch.finfo(torch.float64).eps
    for a, b in [(got, want), *zip(g_got, g_want, strict=True)]:
        torch.testing.assert_close(a, b, rtol=0, atol=eps_bound * max(float(b.detach().abs().max()), 1.0))


def test_chunked_log_softmax_never_keeps_the_whole_logits():
    """What autograd keeps for backward: the whole (tokens x vocabulary) logits on the plain path, at
    most the hidden states and the weight on the chunked one."""
    model = _qwen2(32000, seed=0)
    ids = torch.randint(0, 32000, (2, 65), generator=torch.Generator().manual_seed(0))
    biggest = []

    def keep(t):
        biggest[-1] = max(biggest[-1], t.numel())
        return t

    for chunked in (True, False):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].detach().requires_grad_()
        biggest.append(0)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            if chunked:
                grpo.chunked_selective_log_softmax(hidden, model.lm_head.weight, ids[:, 1:], chunk_tokens=8)
            else:
                grpo.selective_log_softmax(model.lm_head(hidden), ids[:, 1:])
    assert biggest == [32000 * 64, 2 * 64 * 32000]  # the weight (half the logits' size); the logits


def test_chunked_log_softmax_in_bf16_is_the_plain_path_within_rounding():
    model = _qwen2(32000, seed=0, dtype=torch.bfloat16)
    ids = torch.randint(0, 32000, (2, 17), generator=torch.Generator().manual_seed(0))
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].detach().requires_grad_()
    weight = model.lm_head.weight
    got = grpo.chunked_selective_log_softmax(hidden, weight, ids[:, 1:], chunk_tokens=5)
    want = grpo.selective_log_softmax(model.lm_head(hidden), ids[:, 1:])
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max() < 0.05  # |log-probs| ~ 10: one bf16 step of a logit is 0.0078-0.0625
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    g_want = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0) > 0.999


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_equals_the_whole_logits_entropy(temperature):
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64)
    index = torch.randint(0, 9, (2, 5))
    logps, ent = grpo.chunked_log_probs_and_entropy(hidden, weight, index, temperature, chunk_tokens=3)
    logits = hidden.detach() @ weight.T / temperature
    assert torch.allclose(ent.double(), grpo.token_entropy(logits).double(), atol=1e-5)
    logps.sum().backward()
    with_entropy = hidden.grad.clone()
    hidden.grad = None
    grpo.chunked_selective_log_softmax(hidden, weight, index, temperature, chunk_tokens=3).sum().backward()
    assert torch.equal(hidden.grad, with_entropy)  # asking for the entropy changes no gradient
    assert grpo.chunked_log_probs_and_entropy(hidden, weight, index, entropy=False)[1] is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_gradient_is_the_whole_logits_one(temperature):
    """The entropy bonus's gradient through the chunked path (d H / d l = -p (l - E_p[l])) equals
    autograd's through the whole logits, with the log-probs' gradient added, in float64."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 9, (2, 5))
    w_ent, w_lp = torch.linspace(-1, 1, 10, dtype=torch.float64).view(2, 5), torch.rand(2, 5, dtype=torch.float64)
    logps, ent = grpo.chunked_log_probs_and_entropy(hidden, weight, index, temperature, chunk_tokens=3)
    ((ent * w_ent).sum() + (logps * w_lp).sum()).backward()
    chunked = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T / temperature
    whole_ent = grpo.token_entropy(logits, grad=True)
    whole_lp = grpo.selective_log_softmax(logits, index)
    ((whole_ent * w_ent).sum() + (whole_lp * w_lp).sum()).backward()
    torch.testing.assert_close(chunked[0], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked[1], weight.grad, rtol=1e-10, atol=1e-12)
    hidden.grad = None
    ent_only = grpo.chunked_log_probs_and_entropy(hidden, weight.detach(), index, temperature, chunk_tokens=3)[1]
    ent_only.sum().backward()  # the entropy alone (no log-prob gradient reaching backward)
    logits = hidden @ weight.detach().T / temperature
    expected = torch.autograd.grad(grpo.token_entropy(logits, grad=True).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-10, atol=1e-12)


def test_chunked_log_probs_with_an_fp32_head_on_bf16_hidden_states():
    torch.manual_seed(3)
    hidden = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float32, requires_grad=True)
    index = torch.randint(0, 11, (4,))
    logps = grpo.chunked_selective_log_softmax(hidden, weight, index, chunk_tokens=3)
    logps.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    h = hidden.detach().float().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    ref = grpo.selective_log_softmax(h @ w.T, index)
    ref.sum().backward()
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)  # the same float32 matmuls
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h.grad.bfloat16(), rtol=1e-2, atol=1e-2)  # one bf16 rounding


# ---------------------------------------------------------------- the 2026 losses, estimators and stabilisers

def _ratio_logps(ratios, old=-1.0):
    """(B, T) log-probs whose ratio to ``old`` is ``ratios``, with a gradient, and the old log-probs."""
    old_t = torch.full((len(ratios), len(ratios[0])), old, dtype=torch.float64)
    logp = (old_t + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    return logp, old_t


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_at_ratio_one_every_new_loss_gives_the_plain_policy_gradient(loss_type):
    """pi_old = pi_theta.detach(): d loss / d logp_t = -A_i / (aggregation's normaliser), as the grpo loss's."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    out = grpo.policy_loss(loss_type=loss_type, epsilon_high=5.0)(logp, adv, mask)
    norm = grpo.loss_normalizer(mask, loss_type, 3)
    (grpo.sequence_terms(out.loss, mask, loss_type).sum() / norm).backward()
    per_row = 1 / mask.sum(-1, keepdim=True) / 2 if loss_type == "sapo" else torch.full((2, 1), 1 / 5.0, dtype=torch.float64)
    torch.testing.assert_close(logp.grad, -adv.unsqueeze(-1) * per_row * mask, rtol=1e-12, atol=1e-12)


def test_cispo_caps_and_detaches_the_weight():
    # ratios 0.5, 2, 8 with cap 5: weights 0.5, 2, 5 (detached), times A * logp
    logp, old = _ratio_logps([[0.5, 2.0, 8.0]])
    sur = grpo.cispo_surrogate(logp - old, logp, torch.tensor([2.0], dtype=torch.float64), cap=5.0)
    expected = -torch.tensor([[0.5, 2.0, 5.0]], dtype=torch.float64) * 2.0 * logp.detach()
    torch.testing.assert_close(sur.loss, expected, rtol=1e-12, atol=1e-12)
    sur.loss.sum().backward()
    # gradient: -w * A per token (no gradient through the weight, none clipped away: unlike PPO's clip)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -4.0, -10.0]], dtype=torch.float64))
    assert sur.high.tolist() == [[False, False, True]] and not sur.low.any()
    neg = grpo.cispo_surrogate(logp - old, logp, torch.tensor([-1.0], dtype=torch.float64), cap=5.0)
    assert not neg.high.any()  # TRL counts the capped weights of positive advantages only


def test_sapo_soft_gate_by_hand():
    tau_pos, tau_neg = 1.0, 2.0
    logp, old = _ratio_logps([[1.0, 1.5]])
    for a, tau in ((1.0, tau_pos), (-1.0, tau_neg)):
        lp = logp.detach().clone().requires_grad_(True)
        sur = grpo.sapo_surrogate(lp - old, torch.tensor([a], dtype=torch.float64), tau_pos, tau_neg)
        sig = [1 / (1 + math.exp(-tau * (r - 1))) for r in (1.0, 1.5)]
        torch.testing.assert_close(sur.loss, torch.tensor([[-s * 4 / tau * a for s in sig]], dtype=torch.float64))
        sur.loss.sum().backward()
        # d/dlogp = -A * 4 sigma (1 - sigma) * rho: exactly -A at rho = 1, attenuated smoothly at 1.5
        grads = [-a * 4 * s * (1 - s) * r for s, r in zip(sig, (1.0, 1.5), strict=True)]
        torch.testing.assert_close(lp.grad, torch.tensor([grads], dtype=torch.float64))
        assert lp.grad[0, 0].item() == pytest.approx(-a)
        assert abs(lp.grad[0, 1].item()) < abs(a) * 1.5  # below what the unclipped ratio would give


def test_vespo_gamma_weight_by_hand():
    # row 1: log-ratios 0.1, 0.2 (summed: w = e^0.3), A > 0 -> k=2, lambda=3; row 2: w = 1, A < 0 -> phi(1) = 1
    logp, old = _ratio_logps([[math.exp(0.1), math.exp(0.2)], [1.0, 1.0]])
    mask = torch.ones(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    phi = grpo.vespo_weights(logp - old, mask, adv, 2.0, 3.0, 3.0, 2.0)
    w = math.exp(0.3)
    assert phi[0, 0].item() == pytest.approx(math.exp(3.0 + 2.0 * 0.3 - 3.0 * w), rel=1e-12)
    assert phi[1, 0].item() == pytest.approx(1.0, rel=1e-12)
    assert not phi.requires_grad
    sur = grpo.vespo_surrogate(logp - old, logp, mask, adv, 2.0, 3.0, 3.0, 2.0)
    sur.loss.sum().backward()
    torch.testing.assert_close(logp.grad, -(phi * adv.unsqueeze(-1)).expand(2, 2))
    masked = grpo.vespo_weights(logp - old, torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64), adv,
                                2.0, 3.0, 3.0, 2.0)  # padding's log-ratio left out of the sum
    assert masked[0, 0].item() == pytest.approx(math.exp(3.0 + 2.0 * 0.1 - 3.0 * math.exp(0.1)), rel=1e-12)


def test_luspo_is_gspo_scaled_by_each_sequence_length():
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.5, -0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() + torch.tensor([[0.05, -0.05, 0.0], [0.1, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    objective = grpo.policy_loss("sequence", loss_type="luspo")
    out = objective(logp, adv, mask, old_logp=old)
    gspo = grpo.sequence_terms(out.loss, mask, "grpo")  # the GSPO sequence losses
    luspo = grpo.sequence_terms(out.loss, mask, "luspo")
    torch.testing.assert_close(luspo, gspo * mask.sum(-1))
    assert grpo.loss_normalizer(mask, "luspo", 3) == 2.0  # then the mean over sequences


def test_bnpo_is_dapo_on_one_batch_and_the_mean_of_micro_batch_token_means():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    whole = grpo.loss_normalizer(mask, "bnpo", 3)
    one = grpo.sequence_terms(per_token, mask, "bnpo").sum() / grpo.pass_normalizer(mask, "bnpo", whole, 1)
    dapo = grpo.sequence_terms(per_token, mask, "dapo").sum() / grpo.loss_normalizer(mask, "dapo", 3)
    assert one.item() == dapo.item() == pytest.approx(10 / 4)
    # two micro-batches: (6 / 3 + 4 / 1) / 2 = 3, where dapo stays 10 / 4
    parts = [grpo.sequence_terms(per_token[i:i + 1], mask[i:i + 1], "bnpo").sum()
             / grpo.pass_normalizer(mask[i:i + 1], "bnpo", whole, 2) for i in (0, 1)]
    assert sum(parts).item() == pytest.approx(3.0)
    assert grpo.pass_normalizer(mask[:1], "dapo", 4.0, 2) == 4.0  # the others keep the batch's normaliser


def test_rloo_baseline_leaves_the_sample_out():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, NAN, 0.0, 0.5], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = advantage.rloo_advantages(r)
    # group 1: A_0 = 1 - mean(0, 0, 1) = 2/3, A_1 = 0 - mean(1, 0, 1) = -2/3
    torch.testing.assert_close(adv[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=torch.float64))
    # group 2: the ungradable reward is in no baseline: A_0 = 1 - mean(0, 0.5) = 0.75
    torch.testing.assert_close(adv[1], torch.tensor([0.75, 0.0, -0.75, 0.0], dtype=torch.float64))
    assert torch.equal(adv[2], torch.zeros(4, dtype=torch.float64))  # flat: exactly 0
    # = n / (n - 1) * (r - mean): the group estimator without scaling, times n / (n - 1)
    torch.testing.assert_close(adv[0], advantage.group_advantages(r[:1], "none")[0] * 4 / 3)


def test_reinforce_plus_plus_baseline_whitens_over_the_batch_tokens():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    lengths = torch.tensor([[2, 1], [3, 3], [1, 1]])
    adv = advantage.reinforce_plus_plus_baseline_advantages(r, lengths, eps=0.0)
    centred = [0.5, -0.5, 0.0, 0.0, -0.5, 0.5]  # r - group mean
    weights = [2, 1, 3, 3, 1, 1]
    tokens = [c for c, w in zip(centred, weights, strict=True) for _ in range(w)]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1))
    expected = [(c - mean) / std for c in centred]
    expected[2] = expected[3] = 0.0  # the flat group stays 0
    torch.testing.assert_close(adv.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_estimators_are_chosen_once_by_name():
    r = torch.tensor([[1.0, 0.0, 0.0]])
    lengths = torch.tensor([[3, 1, 2]])
    assert torch.equal(advantage.advantage_fn("rloo")(r, lengths), advantage.rloo_advantages(r))
    assert torch.equal(advantage.advantage_fn("grpo", "none")(r, lengths), advantage.group_advantages(r, "none"))
    assert torch.equal(advantage.advantage_fn("reinforce_plus_plus_baseline")(r, lengths),
                       advantage.reinforce_plus_plus_baseline_advantages(r, lengths))
    with pytest.raises(ValueError, match="adv_estimator"):
        advantage.advantage_fn("ppo")


def test_normalize_then_sum_normalises_each_term_in_its_group():
    # 2 groups of 2, terms (accuracy, format) with weights (1, 0.5)
    terms = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    adv = advantage.decoupled_advantages(terms, weights, eps=0.0)
    s = 1 / math.sqrt(0.5)  # a group (1, 0): deviations +-0.5 over an unbiased std sqrt(0.5)
    summed = torch.tensor([0.5 * s * 1.5, -0.5 * s * 1.5, -0.5 * s * 0.5, 0.5 * s * 0.5], dtype=torch.float64)
    expected = (summed - summed.mean()) / summed.std()
    torch.testing.assert_close(adv.flatten(), expected, rtol=1e-12, atol=1e-12)
    # sum_then_normalize of the same rewards differs: the 0.5-weight format term is not scaled up
    plain = advantage.group_advantages((terms * weights).sum(-1), "group", eps=0.0)
    assert not torch.allclose(plain.flatten(), expected)
    # an ungradable term: that completion gets 0 and is in no statistic
    terms[0, 1, 1] = NAN
    adv = advantage.decoupled_advantages(terms, weights, eps=0.0)
    assert adv[0].tolist() == [0.0, 0.0]  # group 1 has one gradable completion left: flat
    f = advantage.advantage_fn(eps=0.0, aggregation="normalize_then_sum")
    assert f.decoupled and torch.equal(f(terms.sum(-1), torch.ones(2, 2), terms, weights), adv)


def test_off_policy_mask_drops_far_negative_sequences_only():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-0.2, -0.6], [-0.2, -0.6], [-0.9, -1.0]], dtype=torch.float64)  # mean KL 0.6, 0.6, 0.05
    mask = torch.ones(3, 2, dtype=torch.float64)
    keep = grpo.off_policy_mask(logp, old, mask, torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64), 0.5)
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0]  # far and negative; far but positive; near
    objective = grpo.policy_loss(off_policy_threshold=0.5)
    out = objective(logp.requires_grad_(True), torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64), mask,
                    old_logp=old)
    assert out.masked.flatten().tolist() == [True, False, False]
    assert torch.equal(out.loss[0], torch.zeros(2, dtype=torch.float64))


def test_bias_corrected_kl_is_the_k3_estimate_times_the_ratio():
    logp, old = _ratio_logps([[2.0, 0.5]])
    ref = old + torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    adv = torch.zeros(1, dtype=torch.float64)  # the KL term alone
    out = grpo.policy_loss(beta=0.1, bias_correction_kl=True)(logp, adv, mask, old_logp=old, ref_logp=ref)
    k3 = grpo.k3_kl(logp.detach(), ref)
    torch.testing.assert_close(out.kl, k3 * torch.tensor([[2.0, 0.5]], dtype=torch.float64))
    out.loss.sum().backward()
    # d/dlogp [rho * k3] = rho * k3 + rho * (1 - exp(ref - logp)), times beta
    d = ref - logp.detach()
    rho = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, 0.1 * (rho * k3 + rho * (1 - torch.exp(d))))


def test_adaptive_entropy_coefficient_steps_and_gates():
    assert grpo.next_entropy_coef(0.01, 0.1, 0.2, 0.005, 0.0, 0.012) == 0.012  # below target: up, to the ceiling
    assert grpo.next_entropy_coef(0.01, 0.3, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.005)  # above: down
    assert grpo.next_entropy_coef(0.002, 0.3, 0.2, 0.005, 0.0, 1.0) == 0.0  # to the floor
    assert grpo.applied_entropy_coef(0.05, 0.3, True, 0.2) == 0.0  # adaptive: only at or below the target
    assert grpo.applied_entropy_coef(0.05, 0.2, True, 0.2) == 0.05
    assert grpo.applied_entropy_coef(0.05, 9.0, False, 0.2) == 0.05


def test_entropy_bonus_gradient_by_hand():
    logits = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    ent = grpo.token_entropy(logits, grad=True)
    bonus = grpo.entropy_bonus(ent, torch.ones(1, 1, dtype=torch.float64), tokens=2.0)
    bonus.backward()
    p = torch.softmax(logits.detach(), -1)
    mean_logit = (p * logits.detach()).sum(-1, keepdim=True)
    torch.testing.assert_close(bonus.detach(), -(p * torch.log(p)).sum() / 2)
    torch.testing.assert_close(logits.grad, -p * (logits.detach() - mean_logit) / 2)
    assert not grpo.token_entropy(logits).requires_grad  # the metric's entropy carries no gradient


def test_mix_into_moves_the_reference_alpha_of_the_way():
    ref, pol = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])], [torch.tensor([3.0, 0.0]), torch.tensor([[1.0]])]
    grpo.mix_into(ref, pol, 0.25)
    assert ref[0].tolist() == [1.5, 1.5] and ref[1].tolist() == [[0.25]]
    grpo.mix_into(ref, pol, 1.0)
    assert ref[0].tolist() == [3.0, 0.0]


def test_loss_types_are_one_registry_entry_each_with_their_settings():
    """An entry holds the policy term, its aggregation and whether it clips; a loss type's own settings
    default to the schema's and no other setting is taken."""
    from mgrpo_cli.config.schema import GRPOConfig

    for name, kind in grpo.LOSS_TYPES.items():
        loss = grpo.policy_loss(loss_type=name, epsilon_high=5.0 if name == "cispo" else None)
        assert loss.objective is kind.objective and loss.aggregation is kind.aggregation is grpo.AGGREGATIONS[name]
        assert loss.settings == {k: getattr(GRPOConfig, k) for k in kind.settings}
        assert all(hasattr(GRPOConfig, k) for k in kind.settings)
    assert grpo.policy_loss(loss_type="sapo", sapo_temperature_neg=2.0).settings == {
        "sapo_temperature_pos": GRPOConfig.sapo_temperature_pos, "sapo_temperature_neg": 2.0}
    with pytest.raises(ValueError, match="sapo_temperature_pos"):
        grpo.policy_loss(loss_type="grpo", sapo_temperature_pos=1.0)
    assert grpo.policy_loss(loss_type="vespo", vespo=(1.0, 2.0, 3.0, 4.0)).settings == {
        "vespo_k_pos": 1.0, "vespo_lambda_pos": 2.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 4.0}


# ---------------------------------------------------------------- the sampler/trainer gap (issue 32)

E05, E_1, E_05 = 1.6487212707001282, 0.36787944117144233, 0.6065306597126334  # e^0.5, e^-1, e^-0.5
# row 0: token log-ratios log(pi_old / pi_sampler) = +0.5, -1.0 and a padded position; its sum -0.5
# row 1: +0.8 on each of three tokens (ratio e^0.8 = 2.2255), its sum 2.4 (ratio e^2.4 = 11.02)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.2, -0.2]], dtype=torch.float64)
SAMPLED = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
CAP = 1.5
IS_CASES = {  # mode -> (weights, capped), by hand: padding gets weight 1 and is never capped
    "token_truncate": ([[CAP, E_1, 1.0], [CAP, CAP, CAP]], [[True, False, False], [True, True, True]]),
    "token_mask": ([[0.0, E_1, 1.0], [0.0, 0.0, 0.0]], [[True, False, False], [True, True, True]]),
    "sequence_truncate": ([[E_05, E_05, 1.0], [CAP, CAP, CAP]], [[False, False, False], [True, True, True]]),
    "sequence_mask": ([[E_05, E_05, 1.0], [0.0, 0.0, 0.0]], [[False, False, False], [True, True, True]]),
}


@pytest.mark.parametrize("mode", list(IS_CASES))
def test_rollout_is_weights_equal_the_hand_computed_ones(mode):
    w, capped = grpo.rollout_is_weights(OLD, SAMPLED, MASK, mode, CAP)
    want, want_capped = IS_CASES[mode]
    # float64 throughout: exp of a difference of exact binary fractions, to a few ulps
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert capped.tolist() == want_capped
    assert not w.requires_grad


def test_rollout_gap_sums_by_hand():
    gap = grpo.rollout_gap(OLD, SAMPLED, MASK)
    # |d| = 0.5 + 1.0 + 3 x 0.8; k3 = r - 1 - d per token
    assert gap["abs_diff"].item() == pytest.approx(3.9, rel=1e-12)
    k3 = (E05 - 1 - 0.5) + (E_1 - 1 + 1.0) + 3 * (math.exp(0.8) - 1 - 0.8)
    assert gap["kl"].item() == pytest.approx(k3, rel=1e-12)
    assert gap["ratio_max"].item() == pytest.approx(math.exp(0.8), rel=1e-12)
    assert gap["tokens"].item() == 5 and gap["rows"].item() == 2


def test_is_weights_multiply_the_policy_term_only():
    """With beta > 0 the KL term stays as it is; the policy term of each token is scaled by its weight."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.8, -0.4]], dtype=torch.float64)
    adv = torch.tensor([0.7], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64)
    loss = grpo.policy_loss(beta=0.1)
    plain = loss(logp, adv, mask, ref_logp=ref)
    weighted = loss(logp, adv, mask, ref_logp=ref, is_weights=weights)
    kl = 0.1 * grpo.k3_kl(logp.detach(), ref)
    # ratio 1 in value: the policy term is -A per token
    assert torch.allclose(weighted.loss - kl, -0.7 * weights, rtol=1e-12, atol=1e-15)
    assert torch.allclose(plain.loss - kl, torch.full((1, 3), -0.7, dtype=torch.float64), rtol=1e-12, atol=1e-15)
