"""The fast sampling path gives the same tokens and log-probs as model.generate + a plain forward."""
import dataclasses
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from mgrpo_cli.algo.loss import completion_logps
from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import ModelConfig
from mgrpo_cli.models.loading import load_policy
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rollout.decode import lean_supported
from mgrpo_cli.rollout.engine import HFEngine, Rollout, batch_buckets, bucket_for, concat_rollouts, sample

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
PADDED = ["12+7-5\n", "3+4\n", "18-9+1-2\n", "7\n"]  # left padding


def _tiny(seed=0, attn="eager"):
    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(OmegaConf.structured(ModelConfig(attn_implementation=attn))), tok, seed=seed).eval()
    return model, tok


def _bias_eos(model, tok, scale=3.0):
    """Make EOS likely enough that some rows stop early (exercises row dropping)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.eos_token_id] *= scale


def _on(ro: Rollout, device: str) -> Rollout:
    return dataclasses.replace(ro, prompt_ids=ro.prompt_ids.to(device), prompt_mask=ro.prompt_mask.to(device),
                               completion_ids=ro.completion_ids.to(device),
                               completion_mask=ro.completion_mask.to(device))


def _warm_start():
    """The shipped warm start (a trained tiny model: peaked distributions, rows stop at different steps), fp32."""
    from mgrpo_cli.training.warmup import SHIPPED

    path = next(p for p in sorted(SHIPPED.iterdir()) if (p / "warmup.json").is_file())
    model, tok = load_policy(build.model_spec(OmegaConf.structured(ModelConfig(path=str(path), dtype="float32"))))
    return model.eval(), tok


def _assert_greedy_equals_generate(model, tok, prompts, lean, n=1, max_new_tokens=20, **kw):
    """``sample`` at temperature 0 (n rows per prompt) gives ``model.generate``'s greedy tokens, cut at EOS."""
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask, _ = sample(model, enc.input_ids, enc.attention_mask, n=n, max_new_tokens=max_new_tokens,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.0, lean=lean,
                       **kw)
    assert ids.device == device
    ref = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:].repeat_interleave(n, 0)
    ref_mask = torch.ones_like(ref)
    for r in range(ref.shape[0]):  # generate pads after EOS; our mask covers tokens up to EOS
        eos = (ref[r] == tok.eos_token_id).nonzero()
        if len(eos):
            ref_mask[r, eos[0, 0] + 1:] = 0
    w = ids.shape[1]
    assert torch.equal(ids, torch.where(ref_mask.bool(), ref, tok.pad_token_id)[:, :w])
    assert torch.equal(mask, ref_mask[:, :w])
    assert (ref[:, w:] == tok.pad_token_id).all()


@pytest.mark.parametrize("prompts", [PADDED, ["12+7\n", "3+41\n", "18-9\n", "70-2\n"]])  # none: no attention mask
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lean", [True, False])  # LeanDecoder, or the model's forward with its own cache
def test_greedy_tokens_equal_model_generate(prompts, attn, lean):
    model, tok = _tiny(attn=attn)
    assert lean_supported(model)
    _bias_eos(model, tok)
    _assert_greedy_equals_generate(model, tok, prompts, lean)


def test_batch_buckets():
    assert batch_buckets(64) == [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert batch_buckets(40) == [40, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert batch_buckets(5) == [5, 4, 3, 2, 1] and batch_buckets(1) == [1]
    assert [bucket_for(c, batch_buckets(64)) for c in (64, 49, 48, 33, 25, 7, 1)] == [64, 64, 48, 48, 32, 8, 1]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_greedy_tokens_equal_model_generate_with_buckets_and_deferred_checks(check_every, static):
    """Rows looked at every few steps, shrunk to bucket sizes, finished rows writing padding meanwhile,
    and the static step (whole-buffer attention, on-device column): still ``model.generate``'s tokens."""
    model, tok = _warm_start()
    prompts = PADDED + ["2+20-11+5\n", "15-3\n", "9+9+9\n"]
    _assert_greedy_equals_generate(model, tok, prompts, True, n=3, max_new_tokens=40, check_every=check_every,
                                   static=static)
    model, tok = _tiny(attn="sdpa")  # rows that run to the end
    _bias_eos(model, tok)
    _assert_greedy_equals_generate(model, tok, PADDED, True, n=2, check_every=check_every, static=static)


@pytest.mark.parametrize("check_every", [1, 8])
def test_decode_steps_see_only_bucket_sizes(monkeypatch, check_every):
    from mgrpo_cli.rollout import decode

    seen = []
    step = decode.LeanDecoder.step
    monkeypatch.setattr(decode.LeanDecoder, "step", lambda self, tokens, *a: seen.append(tokens.shape[0])
                        or step(self, tokens, *a))
    model, tok = _warm_start()
    enc = tok(PADDED + ["2+20-11+5\n", "15-3\n"], return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask, _ = sample(model, enc.input_ids, enc.attention_mask, n=8, max_new_tokens=48,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), check_every=check_every)
    assert mask.sum(-1).unique().numel() > 3  # rows stopped at many different steps
    assert set(seen) <= set(batch_buckets(48)) and len(set(seen)) > 2
    assert seen == sorted(seen, reverse=True)  # the batch only shrinks
    if check_every > 1:  # shrinking happens only at the looks, after tokens check_every - 1, 2 * check_every - 1, ...
        changes = [t for t in range(1, len(seen)) if seen[t] != seen[t - 1]]  # seen[t]: the step feeding token t
        assert changes and all((t + 1) % check_every == 0 for t in changes)


def _plain_forward_probs(model, enc, ids, mask, n, temperature):
    """Next-token distributions of a plain forward over prompt + completion, at each completion position."""
    full_mask = torch.cat([enc.attention_mask.repeat_interleave(n, 0), mask], 1)
    full = torch.cat([enc.input_ids.repeat_interleave(n, 0), ids], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    return torch.softmax(logits[:, enc.input_ids.shape[1] - 1:-1] / temperature, -1)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("check_every", [1, 8])
def test_sampled_tokens_follow_the_models_distribution(check_every, static):
    """The distributional contract of sampling, through buckets and deferred checks: (1) with top_p every
    token lies in the nucleus of the plain forward's distribution at its position (so each row was fed
    its own context); (2) at top_p = 1, how often the most likely token is drawn matches its summed
    probability within 4 standard deviations; (3) rows end at EOS and are padded after it."""
    model, tok = _warm_start()
    enc = tok(PADDED + ["15-3\n"], return_tensors="pt", padding=True, add_special_tokens=False)
    n, kw = 48, dict(max_new_tokens=40, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     check_every=check_every, static=static)

    ids, mask, _ = sample(model, enc.input_ids, enc.attention_mask, n=n, temperature=1.0, top_p=0.6,
                       generator=torch.Generator().manual_seed(1), **kw)
    probs = _plain_forward_probs(model, enc, ids, mask, n, 1.0)
    p_tok = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    mass_above = (probs * (probs > p_tok.unsqueeze(-1))).sum(-1)  # probability of the tokens ranked above it
    assert (mass_above[mask.bool()] < 0.6 + 1e-4).all()
    assert len(set(map(tuple, ids.tolist()))) > len(enc.input_ids)  # groups are not all one sample

    ids, mask, _ = sample(model, enc.input_ids, enc.attention_mask, n=n, temperature=3.0, top_p=1.0,
                       generator=torch.Generator().manual_seed(2), **kw)
    probs = _plain_forward_probs(model, enc, ids, mask, n, 3.0)[mask.bool()]
    top_p, top = probs.max(-1)
    drawn = (top == ids[mask.bool()]).sum().item()
    expected, sd = top_p.sum().item(), (top_p * (1 - top_p)).sum().sqrt().item()
    assert abs(drawn - expected) < 4 * sd and 0.1 < expected / len(top_p) < 0.9
    lengths = mask.sum(-1)
    ended = lengths < ids.shape[1]
    assert ended.any() and (ids[ended, lengths[ended] - 1] == tok.eos_token_id).all()
    assert (ids[~mask.bool()] == tok.pad_token_id).all()


@CUDA
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lean", [True, False])
def test_greedy_tokens_equal_model_generate_on_cuda(lean, attn, n):
    """fp32 on the GPU: the same tokens as ``model.generate`` there (padded prompts, rows stopping early)."""
    model, tok = _tiny(attn=attn)
    _bias_eos(model, tok)
    _assert_greedy_equals_generate(model.cuda(), tok, PADDED, lean, n=n)


@CUDA
@pytest.mark.parametrize("check_every", [1, 8])
def test_static_step_greedy_tokens_equal_model_generate_on_cuda(check_every):
    """fp32 on the GPU: the static step (whole-buffer attention, on-device column), rows shrunk to buckets."""
    model, tok = _warm_start()
    prompts = PADDED + ["2+20-11+5\n", "15-3\n", "9+9+9\n"]
    _assert_greedy_equals_generate(model.cuda(), tok, prompts, True, n=3, max_new_tokens=40, check_every=check_every,
                                   static=True)


@CUDA
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("lean", [True, False])
def test_bf16_greedy_tokens_on_cuda_are_the_plain_forwards_argmax(lean, n):
    """bf16 on the GPU, on the shipped warm start (a trained model, so a broken decode step shows as
    tokens far from the argmax): every greedy token is, within bf16 rounding, the argmax of a plain
    forward over prompt + completion (exact equality with ``model.generate`` is not asked: bf16 ties
    may break either way on different kernels)."""
    from mgrpo_cli.training.warmup import SHIPPED

    path = next(p for p in sorted(SHIPPED.iterdir()) if (p / "warmup.json").is_file())
    model, tok = load_policy(build.model_spec(OmegaConf.structured(ModelConfig(path=str(path), dtype="bfloat16"))), "gpu")
    model = model.cuda().eval()
    assert model.dtype == torch.bfloat16
    prompts = PADDED + ["2+20-11+5\n", "15-3\n"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    ids, mask, _ = sample(model, enc.input_ids, enc.attention_mask, n=n, max_new_tokens=48,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.0, lean=lean)
    full_mask = torch.cat([enc.attention_mask.repeat_interleave(n, 0), mask], 1)
    full = torch.cat([enc.input_ids.repeat_interleave(n, 0), ids], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, enc.input_ids.shape[1] - 1:-1].float()  # position t predicts completion token t
    gap = (logits.max(-1).values - logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1))[mask.bool()]
    # logits reach ~15 here, where one bf16 step is 0.0625; the model's top-2 margin is ~10 (median)
    assert gap.max().item() < 0.5
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert all(texts[i * n:(i + 1) * n] == [texts[i * n]] * n for i in range(len(prompts)))  # greedy groups agree
    assert sum("\\boxed{" in t for t in texts) >= len(texts) // 2  # the warm start answers in its format


@pytest.mark.parametrize("device", DEVICES)
def test_logps_equal_plain_forward_and_groups_repeat(device):
    model, tok = _tiny(seed=1)
    model.to(device)
    engine = HFEngine(model, tok, max_prompt_length=512)
    ro = engine.generate(["5+5\n", "1-19+3\n"], n=3, max_new_tokens=12, temperature=0.0)
    assert ro.completion_ids.shape[0] == 6 and ro.prompt_ids.shape[0] == 6 and ro.n == 3
    assert ro.texts[0] == ro.texts[1] == ro.texts[2]  # greedy: the group is identical
    logps = completion_logps(model, ro, torch.arange(6), temperature=1.0)
    for r in range(6):
        p = ro.prompt_ids[r][ro.prompt_mask[r].bool()]
        c = ro.completion_ids[r][ro.completion_mask[r].bool()]
        full = torch.cat([p, c]).unsqueeze(0)
        with torch.no_grad():
            logits = model(full).logits[0, len(p) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(-1, c.unsqueeze(-1)).squeeze(-1)
        got = logps[r][ro.completion_mask[r].bool()]
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_pass_gives_plain_forward_logps_and_gradients(attn, device):
    """Running each prompt once for its group's rows changes neither log-probs nor gradients."""
    model, tok = _tiny(seed=2, attn=attn)
    _bias_eos(model, tok, scale=2.0)
    ro = HFEngine(model, tok, max_prompt_length=512, seed=1).generate(["5+5\n", "12-3+4\n", "7\n"], n=3, max_new_tokens=12,
                                               temperature=1.0)  # sampled on the CPU: seeded
    assert ro.prompt_mask.sum(-1).unique().numel() > 1 and ro.lengths.unique().numel() > 1
    model, ro = model.to(device), _on(ro, device)
    tol = dict(atol=1e-5) if device == "cpu" else dict(atol=1e-4, rtol=1e-4)  # GPU kernels sum in other orders
    params = list(model.parameters())
    results = []
    for rollout in (ro, dataclasses.replace(ro, n=1)):  # n=1: every row its own group, one sequence per row
        logps = completion_logps(model, rollout, torch.tensor([3, 4, 5, 0, 1, 8]), temperature=0.7)
        grads = torch.autograd.grad((logps * rollout.completion_mask[[3, 4, 5, 0, 1, 8]]).sum(), params)
        results.append((logps, grads))
    (shared, g_shared), (plain, g_plain) = results
    assert shared.device.type == device
    assert torch.allclose(shared, plain, **tol)
    assert all(torch.allclose(a, b, **tol) for a, b in zip(g_shared, g_plain, strict=True))


def test_gradient_checkpointing_runs_one_sequence_per_row():
    """Checkpointed layers drop the cache when gradients are on, so the shared-prompt pass must not be used."""
    model, tok = _tiny(seed=2)
    ro = HFEngine(model, tok, max_prompt_length=512, seed=1).generate(["5+5\n", "12-3+4\n"], n=3, max_new_tokens=8, temperature=1.0)
    want = completion_logps(model, ro, torch.arange(6), temperature=1.0).detach()
    model.activation_checkpointing_enable()
    model.train()
    got = completion_logps(model, ro, torch.arange(6), temperature=1.0)
    assert got.requires_grad and torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # no gradients: the cache is kept and the prompts are shared again
        assert torch.allclose(completion_logps(model, ro, torch.arange(6), temperature=1.0), want, atol=1e-5)


def test_sampling_is_seeded():
    model, tok = _tiny()
    a = HFEngine(model, tok, max_prompt_length=512, seed=3).generate(["2+2\n"], n=4, max_new_tokens=8, temperature=1.0)
    b = HFEngine(model, tok, max_prompt_length=512, seed=3).generate(["2+2\n"], n=4, max_new_tokens=8, temperature=1.0)
    assert a.texts == b.texts and len(set(a.texts)) > 1


def test_tokenizer_survives_autotokenizer_round_trip():
    from transformers import AutoTokenizer

    model, tok = _tiny()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        again = AutoTokenizer.from_pretrained(d)
        text = "12+7=19 19-5=14 \\boxed{14}\nWait, let me double-check that.  é"
        ids = again(text, add_special_tokens=False).input_ids
        assert again.decode(ids) == text
        assert ids == tok(text, add_special_tokens=False).input_ids
        reloaded, tok2 = load_policy(build.model_spec(OmegaConf.structured(ModelConfig(path=d))))
        assert tok2.eos_token_id == tok.eos_token_id and tok2.padding_side == "left"
        x = torch.tensor([ids])
        with torch.no_grad():
            assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-6)


def test_lean_decoder_drives_lora_adapters_and_leaves_other_models_to_their_forward():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = _tiny(seed=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a non-zero adapter, so that skipping it would change the tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.eval()
    assert lean_supported(peft_model)
    enc = tok(["12+7-5\n", "3+4\n"], return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(n=2, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.0)
    lean = sample(peft_model, enc.input_ids, enc.attention_mask, lean=True, **kw)
    plain = sample(peft_model, enc.input_ids, enc.attention_mask, lean=False, **kw)
    with peft_model.disable_adapter():
        base = sample(peft_model, enc.input_ids, enc.attention_mask, lean=True, **kw)
    assert torch.equal(lean[0], plain[0]) and torch.equal(lean[1], plain[1])
    assert not torch.equal(lean[0], base[0])

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size + 8, n_embd=32, n_layer=1, n_head=2)).eval()
    assert not lean_supported(gpt2)
    ids, mask, _ = sample(gpt2, enc.input_ids, enc.attention_mask, **kw)  # the model's own forward
    assert ids.shape[0] == 4 and mask.shape == ids.shape


def test_truncated_rows_are_the_ones_the_budget_cut_off():
    model, tok = _tiny(seed=4)
    _bias_eos(model, tok, scale=6.0)
    ro = HFEngine(model, tok, max_prompt_length=512, seed=3).generate(PADDED, n=4, max_new_tokens=6, temperature=1.0)
    ended = [bool(ro.completion_mask[r].sum() < 6 or ro.completion_ids[r, 5] == tok.eos_token_id) for r in range(16)]
    assert ro.truncated.tolist() == [not e for e in ended]
    assert 0 < sum(ended) < 16  # both kinds present
    never = HFEngine(model, tok, max_prompt_length=512, seed=3, stop_at_eos=False).generate(PADDED, n=2, max_new_tokens=3, temperature=1.0)
    assert never.truncated.all()


def test_groups_and_concat_keep_rows_and_log_probs():
    """Dynamic sampling's bookkeeping: groups picked out of rollouts of different widths and put together
    give each row the log-probs it had in its own rollout."""
    model, tok = _tiny(seed=1)
    _bias_eos(model, tok)
    engine = HFEngine(model, tok, max_prompt_length=512, seed=5)
    a = engine.generate(PADDED, n=2, max_new_tokens=7, temperature=1.0)
    b = engine.generate(["1+1\n"], n=2, max_new_tokens=3, temperature=1.0)
    picked = a.groups([2, 0])
    both = concat_rollouts([picked, b], pad_token_id=tok.pad_token_id)
    assert both.texts == [a.texts[4], a.texts[5], a.texts[0], a.texts[1], *b.texts] and both.n == 2
    assert both.truncated.tolist() == [*a.truncated[[4, 5, 0, 1]].tolist(), *b.truncated.tolist()]
    with torch.no_grad():
        got = completion_logps(model, both, torch.arange(6), 1.0)
        want = [(completion_logps(model, a, torch.tensor([4, 5, 0, 1]), 1.0), a.completion_mask[[4, 5, 0, 1]]),
                (completion_logps(model, b, torch.arange(2), 1.0), b.completion_mask)]
    for rows, (ref, ref_mask) in zip((slice(0, 4), slice(4, 6)), want, strict=True):
        assert torch.allclose(got[rows][both.completion_mask[rows].bool()], ref[ref_mask.bool()], atol=1e-5)
    with pytest.raises(ValueError, match="group sizes"):
        concat_rollouts([a, engine.generate(["1\n"], n=3, max_new_tokens=2, temperature=1.0)])


def test_filters_keep_what_top_k_top_p_and_min_p_allow():
    from mgrpo_cli.rollout.engine import filter_probs

    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert filter_probs(p, top_k=2).tolist() == [[0.4, 0.3, 0.0, 0.0]]
    assert filter_probs(p, top_p=0.6).tolist() == [[0.4, 0.3, 0.0, 0.0]]  # 0.4 < 0.6 <= 0.7
    assert filter_probs(p, min_p=0.5).tolist() == [[0.4, 0.3, 0.2, 0.0]]  # >= 0.5 x 0.4
    # in order: top-k's 3 tokens hold 0.9, top_p 0.5 of that (0.45) needs 0.4 + 0.3
    assert filter_probs(p, top_k=3, top_p=0.5).tolist() == [[0.4, 0.3, 0.0, 0.0]]
    assert torch.equal(filter_probs(p), p)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    from mgrpo_cli.rollout.engine import penalize_repeats

    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0, -2.0]]


def test_repetition_penalty_in_sampling_is_the_penalised_greedy_loop():
    """Greedy decoding with a penalty = a plain loop over the model's full forward that penalises every
    token of the prompt and the completion so far (the cache, the batch shrinking and the seen-token
    bookkeeping change nothing)."""
    from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
    from mgrpo_cli.rollout.engine import penalize_repeats, sample

    tok = build_byte_tokenizer()
    cfg = type("Cfg", (), {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "num_key_value_heads": 1, "attn_implementation": "sdpa"})()
    model = build_tiny_model(cfg, tok, seed=0).eval()
    ids = torch.tensor([[65, 66, 67, 65], [0, 70, 71, 72]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    got, _, _ = sample(model, ids, mask, max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=0.0,
                    repetition_penalty=3.0)
    for row in range(2):
        seq = ids[row][mask[row].bool()].tolist()
        for _ in range(6):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[:, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, seq] = True
            seq.append(int(penalize_repeats(logits, seen, 3.0).argmax(-1)))
        assert got[row].tolist() == seq[-6:]
