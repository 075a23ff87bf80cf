"""GRPO math on literal tensors with hand-computed values."""
import math

import pytest
import torch

from mgrpo_cli import grpo

NAN = float("nan")


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv = grpo.group_advantages(r, "group", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s1 = math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1]))
    # group 2: mean 0.25, unbiased std 0.5
    assert torch.allclose(adv[1], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_zero_variance_group_gets_zero_advantage():
    r = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = grpo.group_advantages(r, "group")
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[1], torch.zeros(3))
    assert grpo.zero_variance_share(r) == pytest.approx(2 / 3)


def test_ungradable_left_out_of_group_statistics():
    r = torch.tensor([[1.0, NAN, 0.0]])
    adv = grpo.group_advantages(r, "group", eps=0.0)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(adv, torch.tensor([[0.5 / s, 0.0, -0.5 / s]]))
    assert grpo.zero_variance_share(torch.tensor([[1.0, NAN, NAN]])) == 1.0


def test_batch_and_no_scaling():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    none = grpo.group_advantages(r, "none")
    assert torch.allclose(none, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    batch = grpo.group_advantages(r, "batch", eps=0.0)
    std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std()
    assert torch.allclose(batch, none / std)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(r, "groups")


def test_k3_kl_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.5), math.log(0.4)])
    kl = grpo.k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.0)
    assert kl[1].item() == pytest.approx(2.0 - math.log(2.0) - 1.0)


def test_clipped_surrogate_clips_both_sides():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    # A > 0: ratio 1.5 clipped to 1.2; ratio 0.5 not clipped (min picks 0.5); 1.1 inside
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss_neg, clipped_neg = grpo.clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    # A < 0: min(-r, -clip(r)) -> 0.5 clipped to 0.8, 1.5 stays
    assert torch.allclose(loss_neg, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped_neg.tolist() == [[False, True, False]]


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
    with pytest.raises(ValueError, match="loss_type"):
        grpo.sequence_terms(per_token, mask, "ppo")


def test_grpo_loss_gradient_is_policy_gradient():
    # one update per rollout: ratio = 1, so dL/dlogp_t = -A / |o| for each valid token (grpo aggregation)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = grpo.grpo_loss(logp, adv, mask)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2], [1.0 / 1 / 2, 0.0]])
    assert torch.allclose(logp.grad, expected)
    assert loss.item() == pytest.approx(-(2.0 + -1.0) / 2)


def test_kl_term_enters_loss_only_with_beta():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-2.0]])
    mask = torch.ones(1, 1)
    adv = torch.zeros(1)
    assert grpo.grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.0).item() == pytest.approx(0.0)
    kl = math.exp(-1.0) + 1.0 - 1.0
    assert grpo.grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.1).item() == pytest.approx(0.1 * kl)


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
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_got, g_want))


def test_chunked_log_softmax_passes_gradcheck_and_skips_a_frozen_weight():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (5,), generator=g)

    assert torch.autograd.gradcheck(lambda h, w: grpo._ChunkedLinearLogProb.apply(h, w, index, 1 / 0.7, 2),
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
    through the chunked path and through lm_head + the whole logits: equal log-probs and parameter gradients."""
    model = _qwen2(vocab, seed=0)
    ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(3, 19, generator=torch.Generator().manual_seed(1))  # stands in for advantages x mask
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
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_got, g_want))


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
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.bfloat16
        assert torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), 0) > 0.999
