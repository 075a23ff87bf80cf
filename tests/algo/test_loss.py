"""A layer's loss (mgrpo_cli/algo/loss.py): completion_logps through the chunked lm_head path gives the
whole-logits path's log-probs, gradients and entropies; on the tiny model one update equals the plain
batch loss, a second update against stored log-probs clips, truncated completions and low-entropy
tokens leave the loss, the sequence-level ratio, the cached reference, token counts."""
import dataclasses

import pytest
import torch
from conftest import loss_spec
from omegaconf import OmegaConf

from mgrpo_cli.algo import grpo, loss
from mgrpo_cli.algo.loss import (
    CHUNKED_VOCAB,
    LossSpec,
    completion_logps,
    completion_logps_and_entropy,
    loss_pass,
    output_weight,
    prepare_layer_loss,
)
from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import ModelConfig
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rollout.engine import HFEngine, Rollout


def _qwen2(vocab: int, seed: int = 0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).to(dtype)


def assert_same_sums(got, want, terms: int):
    """Two summation orders of the same float64 values. Each result goes through sums of at most ``terms``
    values (a softmax over the vocabulary, a dot product over the hidden size, a sum over the tokens); the
    rounding of nested sums adds, so two orders differ by at most about terms x eps64 x the magnitude. Ten
    times that bound is still about 1e-10 of the magnitude: a term dropped or counted twice cannot pass."""
    scale = max(float(want.abs().max()), 1.0)
    tol = 10 * terms * torch.finfo(torch.float64).eps * scale
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def _rollout(vocab: int, n: int = 3) -> Rollout:
    """3 groups of n rows: left-padded prompts of 5, 3 and 7 tokens, completions of 1 to 6 tokens."""
    g = torch.Generator().manual_seed(0)
    prompt_lens, rows = [5, 3, 7], 3 * n
    prompt_ids = torch.zeros(rows, 7, dtype=torch.long)
    prompt_mask = torch.zeros(rows, 7, dtype=torch.long)
    for i, p in enumerate(prompt_lens):
        ids = torch.randint(1, vocab, (p,), generator=g)
        prompt_ids[i * n:(i + 1) * n, 7 - p:] = ids
        prompt_mask[i * n:(i + 1) * n, 7 - p:] = 1
    comp_lens = torch.tensor([1, 4, 6, 2, 6, 3, 5, 1, 4][:rows])
    comp_mask = (torch.arange(6)[None] < comp_lens[:, None]).long()
    comp_ids = torch.randint(1, vocab, (rows, 6), generator=g) * comp_mask
    return Rollout(prompt_ids, prompt_mask, comp_ids, comp_mask, [""] * rows, n)


def _logps_and_grads(model, ro, rows, **kw):
    logps = completion_logps(model, ro, rows, temperature=0.7, **kw)
    weights = torch.linspace(-1, 1, logps.numel()).view_as(logps) * ro.completion_mask[rows]
    params = [p for p in model.parameters() if p.requires_grad]
    return logps.detach(), torch.autograd.grad((logps * weights).sum(), params)


@pytest.mark.parametrize("vocab", [260, CHUNKED_VOCAB])
@pytest.mark.parametrize("layout", ["shared", "per_row", "checkpointing"])
def test_chunked_path_gives_the_whole_logits_log_probs_and_gradients(vocab, layout, monkeypatch):
    """In float64: the chunked and whole-logits paths sum in different orders, and float32 rounding of
    those orders depends on the CPU's kernels; float64 leaves only rounding far below a real error."""
    model = _qwen2(vocab, dtype=torch.float64).train()
    if layout == "checkpointing":
        model.activation_checkpointing_enable()
    ro = _rollout(vocab)
    rows = torch.tensor([3, 4, 5, 0, 1, 6, 7, 8])  # runs of one group: the shared-prompt pass
    calls = []
    chunked_fn = grpo.chunked_log_probs_and_entropy
    monkeypatch.setattr(grpo, "chunked_log_probs_and_entropy", lambda *a, **k: calls.append(1) or chunked_fn(*a, **k))
    kw = {"share_prompts": layout != "per_row"}
    auto = _logps_and_grads(model, ro, rows, **kw)
    assert bool(calls) == (vocab >= CHUNKED_VOCAB)  # the default: chunked for large vocabularies only
    chunked = _logps_and_grads(model, ro, rows, chunked=True, **kw)
    whole = _logps_and_grads(model, ro, rows, chunked=False, **kw)
    terms = vocab + 64 + int(ro.completion_mask.sum())  # the softmax, the hidden size, the tokens
    for got in (auto, chunked):
        assert got[0].dtype == torch.float64
        assert_same_sums(got[0], whole[0], terms)
        for a, b in zip(got[1], whole[1], strict=True):
            assert_same_sums(a, b, terms)
    with torch.no_grad():  # the reference's pass (prompts shared even with checkpointing: padding differs)
        mask = ro.completion_mask[rows].bool()
        ref = completion_logps(model, ro, rows, 0.7, chunked=True, **kw)
        assert_same_sums(ref[mask], whole[0][mask], terms)


def test_output_weight_only_for_a_plain_head():
    from peft import LoraConfig, get_peft_model

    model = _qwen2(300)
    assert output_weight(model) is model.lm_head.weight
    adapters = get_peft_model(_qwen2(300), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert output_weight(adapters) is not None  # LoRA on the layers: the head is still plain
    ro, rows = _rollout(300), torch.arange(9)
    with torch.no_grad():
        assert torch.allclose(completion_logps(adapters, ro, rows, 1.0, chunked=True),
                              completion_logps(adapters, ro, rows, 1.0, chunked=False), atol=1e-5)
    on_head = get_peft_model(_qwen2(300), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert output_weight(on_head) is None
    with pytest.raises(ValueError, match="chunked=True"):
        completion_logps(on_head, ro, rows, 1.0, chunked=True)
    assert loss.CHUNKED_VOCAB <= 151936  # Qwen2.5's vocabulary takes the chunked path


ADV = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 0.7, 0.0, -0.7])
ACTIVE = [4, 5, 6, 7, 9, 11]  # the rows with a non-zero advantage


def spec(**kw) -> LossSpec:
    base = dict(beta=0.0, epsilon=0.2, epsilon_high=0.2, loss_type="grpo", scale_rewards="group", std_eps=1e-4,
                temperature=1.0, top_p=1.0, micro_batch_tokens=65536, max_completion_length=8)
    return loss_spec(**{**base, **kw})


@pytest.fixture
def setup():
    """A tiny model and 3 groups of 4 completions of at most 8 tokens."""
    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(OmegaConf.structured(ModelConfig())), tok, seed=3)
    ro = HFEngine(model, tok, max_prompt_length=512, seed=1).generate(["1+2\n", "13+4\n", "5-6\n"], n=4, max_new_tokens=8, temperature=1.0)
    model.train()
    return model, ro


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def _logits(model, ro) -> torch.Tensor:
    """(B, C, V): the logits predicting each completion token, one plain forward per row."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1).clone()
    mask = torch.cat([ro.prompt_mask, ro.completion_mask], 1).clone()
    return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                 ).logits[:, ro.prompt_ids.shape[1] - 1:-1]


def _reference(model, ro, mask, token_mask=None, objective=None):
    """The whole batch's loss in one forward (no skipping, no micro-batches), its gradient."""
    logits = _logits(model, ro)
    logp = grpo.selective_log_softmax(logits, ro.completion_ids.clone())
    out = (objective or grpo.policy_loss())(logp, ADV, mask, token_mask=token_mask)
    value = grpo.sequence_terms(out.loss, mask, "grpo").sum() / grpo.loss_normalizer(mask, "grpo", 8)
    value.backward()
    return value.item(), _grads(model)


def _update(model, ro, spec_, ref_logps=None):
    """One update as the module makes it (``MGRPOModule._update``): the layer's loss prepared, then one
    loss pass whose backward accumulates the gradients; the pass's stats."""
    layer = prepare_layer_loss(model, ro, ADV, spec_, ref_logps=ref_logps)
    return loss_pass(model, layer, spec_, lambda x: x.backward(), ref_logps=ref_logps)


def test_one_iteration_is_the_plain_batch_gradient(setup):
    model, ro = setup
    stats = _update(model, ro, spec())
    got = _grads(model)
    value, want = _reference(model, ro, ro.completion_mask.float())
    assert stats["loss"] == pytest.approx(value, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))
    assert stats["clip_region"] == 0.0 and stats["entropy"] > 0
    assert stats["loss_tokens"] == sum(int(ro.prompt_mask[r].sum() + ro.completion_mask[r].sum()) for r in ACTIVE)
    # as computed: one micro-batch, each of its two groups' prompts once
    assert stats["loss_tokens_computed"] == (int(ro.prompt_mask[[4, 9]].sum())
                                             + sum(int(ro.completion_mask[r].sum()) for r in ACTIVE))
    # two iterations: the first pass runs against the stored log-probs of the same weights: the same gradient
    layer = prepare_layer_loss(model, ro, ADV, spec(num_iterations=2))
    first = loss_pass(model, layer, spec(num_iterations=2), lambda x: x.backward())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_grads(model), want, strict=True))
    assert first["clip_region"] == 0.0 and layer.stats["loss_tokens"] == stats["loss_tokens"]


def test_second_iteration_clips_against_the_stored_log_probs(setup):
    model, ro = setup
    s = spec(num_iterations=2)
    layer = prepare_layer_loss(model, ro, ADV, s)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    passes = []
    for _ in range(2):
        passes.append(loss_pass(model, layer, s, lambda x: x.backward()))
        opt.step()
        opt.zero_grad()
    assert passes[0]["clip_region"] == 0.0
    assert passes[1]["clip_region"] > 0.0
    assert passes[1]["clip_region"] == pytest.approx(passes[1]["clip_low"] + passes[1]["clip_high"])
    assert passes[1]["loss"] != pytest.approx(passes[0]["loss"])


def test_truncated_completions_leave_the_loss(setup, monkeypatch):
    """(Which rows the budget cut off is the rollout's finding, tested in test_rollout; set here.)"""
    model, ro = setup
    cut = [r in (0, 4, 9) for r in range(12)]
    ro = dataclasses.replace(ro, truncated=torch.tensor(cut))
    seen = []
    run = loss.completion_logps_and_entropy
    monkeypatch.setattr(loss, "completion_logps_and_entropy",
                        lambda m, r, rows, *a, **k: seen.append(rows.tolist()) or run(m, r, rows, *a, **k))
    _update(model, ro, spec(mask_truncated_completions=True))
    assert sorted(r for rows in seen for r in rows) == [r for r in ACTIVE if not cut[r]]
    got = _grads(model)
    mask = ro.completion_mask.float() * (~ro.truncated).float().unsqueeze(-1)
    _, want = _reference(model, ro, mask)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))


def test_top_entropy_quantile_trains_on_the_high_entropy_tokens(setup):
    model, ro = setup
    s = spec(top_entropy_quantile=0.25)
    layer = prepare_layer_loss(model, ro, ADV, s)
    loss_pass(model, layer, s, lambda x: x.backward())
    got = _grads(model)
    with torch.no_grad():
        logits = _logits(model, ro)
    counted = ro.completion_mask.float() * (ADV != 0).float().unsqueeze(-1)  # the quantile's tokens: rows run
    top = grpo.top_entropy_mask(grpo.token_entropy(logits), counted, 0.25)
    assert torch.equal(layer.token_mask, top)
    assert 0.2 < top.sum() / counted.sum() <= 0.35
    _, want = _reference(model, ro, ro.completion_mask.float(), token_mask=top)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))


def test_sequence_level_ratio_gives_the_token_level_gradient_at_ratio_one(setup):
    """At the first update (ratio 1) GSPO's gradient A/|y| sum_t grad log p_t is GRPO's (grpo aggregation)."""
    model, ro = setup
    token = _update(model, ro, spec())
    want = _grads(model)
    seq = _update(model, ro, spec(importance_sampling_level="sequence"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_grads(model), want, strict=True))
    assert seq["loss"] == pytest.approx(token["loss"], abs=1e-6)
    assert spec(importance_sampling_level="sequence").policy.log_ratio is grpo.sequence_log_ratio


def test_reference_log_probs_are_stored_once_for_several_iterations(setup):
    model, ro = setup
    calls = []

    def ref(rollout, rows):
        calls.append(len(rows))
        return torch.zeros(len(rows), rollout.completion_ids.shape[1])

    s = spec(beta=0.1, num_iterations=3)
    layer = prepare_layer_loss(model, ro, ADV, s, ref_logps=ref)
    for _ in range(3):
        loss_pass(model, layer, s, lambda x: x.backward(), ref_logps=ref)
    assert sum(calls) == 12  # every row once (beta > 0 runs zero-advantage rows too), not once per pass
    once = spec(beta=0.1)
    calls.clear()
    _update(model, ro, once, ref_logps=ref)
    assert sum(calls) == 12


@pytest.mark.parametrize("layout", ["shared", "per_row"])
def test_entropies_on_the_chunked_path_equal_the_whole_logits(layout):
    model, ro = _qwen2(260), _rollout(260)
    rows = torch.arange(9)
    kw = dict(temperature=0.7, share_prompts=layout == "shared")
    logps_c, ent_c = completion_logps_and_entropy(model, ro, rows, chunked=True, **kw)
    logps_w, ent_w = completion_logps_and_entropy(model, ro, rows, chunked=False, **kw)
    mask = ro.completion_mask.bool()
    assert torch.allclose(logps_c[mask], logps_w[mask], atol=1e-5)
    assert torch.allclose(ent_c[mask], ent_w[mask], atol=1e-5) and (ent_w[mask] > 0).all()
    assert completion_logps_and_entropy(model, ro, rows, chunked=True, entropy=False, **kw)[1] is None


def test_bnpo_divides_each_micro_batch_by_its_own_tokens(setup):
    """Several micro-batches: the loss is the mean of their token means (the reference, one forward per
    micro-batch); one micro-batch: exactly dapo's gradient."""
    model, ro = setup
    s = spec(loss_type="bnpo", micro_batch_tokens=40)
    layer = prepare_layer_loss(model, ro, ADV, s)
    assert len(layer.batches) >= 2
    stats = loss_pass(model, layer, s, lambda x: x.backward())
    got = _grads(model)
    logp = grpo.selective_log_softmax(_logits(model, ro), ro.completion_ids.clone())
    out = grpo.policy_loss()(logp, ADV, ro.completion_mask.float())
    parts = [(out.loss[rows] * ro.completion_mask[rows]).sum() / ro.completion_mask[rows].sum()
             for rows in layer.batches]
    value = sum(parts) / len(parts)
    value.backward()
    assert stats["loss"] == pytest.approx(value.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, _grads(model), strict=True))
    assert sorted(int(r) for rows in layer.batches for r in rows) == list(range(12))  # zero-advantage rows too
    one = _update(model, ro, spec(loss_type="bnpo"))
    one_grads = _grads(model)
    dapo = _update(model, ro, spec(loss_type="dapo"))
    assert one["loss"] == pytest.approx(dapo["loss"], abs=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(one_grads, _grads(model), strict=True))


def test_entropy_bonus_is_the_mean_token_entropy_of_every_counted_row(setup):
    """With a bonus, zero-advantage rows run too (their entropy has a gradient); the gradient is the
    policy term's minus coef x that of the mean entropy over every completion token, in one forward."""
    model, ro = setup
    s = spec(entropy_coef=0.1)
    layer = prepare_layer_loss(model, ro, ADV, s)
    assert sorted(int(r) for rows in layer.batches for r in rows) == list(range(12))
    stats = loss_pass(model, layer, s, lambda x: x.backward(), entropy_coef=0.1)
    got = _grads(model)
    mask = ro.completion_mask.float()
    logits = _logits(model, ro)
    logp = grpo.selective_log_softmax(logits, ro.completion_ids.clone())
    out = grpo.policy_loss()(logp, ADV, mask)
    policy = grpo.sequence_terms(out.loss, mask, "grpo").sum() / grpo.loss_normalizer(mask, "grpo", 8)
    ent = grpo.token_entropy(logits, grad=True)
    value = policy - 0.1 * (ent * mask).sum() / mask.sum()
    value.backward()
    assert stats["loss"] == pytest.approx(value.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, _grads(model), strict=True))
    no_bonus = loss_pass(model, layer, s, lambda x: x.backward(), entropy_coef=0.0)  # coefficient 0: none
    assert no_bonus["loss"] == pytest.approx(policy.item(), abs=1e-6)
    model.zero_grad()


def _backward_nodes(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("vocab", [260, CHUNKED_VOCAB])
def test_shared_prompt_gradients_are_the_same_at_every_repeat_on_two_threads(vocab):
    """The shared-prompt pass repeats each prompt's cache and last output over the prompt's rows. Its backward
    must sum those rows in a fixed order: advanced indexing (IndexBackward0) back-propagates through
    index_put_(accumulate=True), which on CPU adds with atomics across threads, so the gradient's rounding
    followed thread timing and a resumed run drifted from an uninterrupted one. The graph holds no such
    node, and 2-thread repeats agree bit for bit."""
    model, ro = _qwen2(vocab).train(), _rollout(vocab)
    rows = torch.arange(9)  # 3 groups of 3 rows
    lp = completion_logps(model, ro, rows, temperature=0.7, share_prompts=True)
    nodes = _backward_nodes(lp)
    assert "IndexSelectBackward0" in nodes and "IndexBackward0" not in nodes and "IndexPutBackward0" not in nodes
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = _logps_and_grads(model, ro, rows, share_prompts=True)[1]
        for _ in range(5):
            again = _logps_and_grads(model, ro, rows, share_prompts=True)[1]
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    finally:
        torch.set_num_threads(threads)
