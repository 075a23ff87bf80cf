"""The fast sampling path gives the same tokens and log-probs as model.generate + a plain forward."""
import dataclasses
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from mgrpo_cli.config import ModelConfig
from mgrpo_cli.decode import lean_supported
from mgrpo_cli.layers import completion_logps
from mgrpo_cli.modeling import build_byte_tokenizer, build_tiny_model, load_policy
from mgrpo_cli.rollout import HFEngine, sample


def _tiny(seed=0, attn="eager"):
    tok = build_byte_tokenizer()
    model = build_tiny_model(OmegaConf.structured(ModelConfig(attn_implementation=attn)), tok, seed=seed).eval()
    return model, tok


def _bias_eos(model, tok, scale=3.0):
    """Make EOS likely enough that some rows stop early (exercises row dropping)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.eos_token_id] *= scale


@pytest.mark.parametrize("prompts", [["12+7-5\n", "3+4\n", "18-9+1-2\n", "7\n"],  # left padding
                                     ["12+7\n", "3+41\n", "18-9\n", "70-2\n"]])  # none: no attention mask
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lean", [True, False])  # LeanDecoder, or the model's forward with its own cache
def test_greedy_tokens_equal_model_generate(prompts, attn, lean):
    model, tok = _tiny(attn=attn)
    assert lean_supported(model)
    _bias_eos(model, tok)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = sample(model, enc.input_ids, enc.attention_mask, n=1, max_new_tokens=20,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.0, lean=lean)
    ref = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    ref_mask = torch.ones_like(ref)
    for r in range(ref.shape[0]):  # generate pads after EOS; our mask covers tokens up to EOS
        eos = (ref[r] == tok.eos_token_id).nonzero()
        if len(eos):
            ref_mask[r, eos[0, 0] + 1:] = 0
    w = ids.shape[1]
    assert torch.equal(ids, torch.where(ref_mask.bool(), ref, tok.pad_token_id)[:, :w])
    assert torch.equal(mask, ref_mask[:, :w])
    assert (ref[:, w:] == tok.pad_token_id).all()


def test_logps_equal_plain_forward_and_groups_repeat():
    model, tok = _tiny(seed=1)
    engine = HFEngine(model, tok)
    ro = engine.generate(["5+5\n", "1-19+3\n"], n=3, max_new_tokens=12, temperature=0.0)
    assert ro.completion_ids.shape[0] == 6 and ro.num_groups == 2
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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_pass_gives_plain_forward_logps_and_gradients(attn):
    """Running each prompt once for its group's rows changes neither log-probs nor gradients."""
    model, tok = _tiny(seed=2, attn=attn)
    _bias_eos(model, tok, scale=2.0)
    ro = HFEngine(model, tok, seed=1).generate(["5+5\n", "12-3+4\n", "7\n"], n=3, max_new_tokens=12,
                                               temperature=1.0)
    assert ro.prompt_mask.sum(-1).unique().numel() > 1 and ro.lengths.unique().numel() > 1
    params = list(model.parameters())
    results = []
    for rollout in (ro, dataclasses.replace(ro, n=1)):  # n=1: every row its own group, one sequence per row
        logps = completion_logps(model, rollout, torch.tensor([3, 4, 5, 0, 1, 8]), temperature=0.7)
        grads = torch.autograd.grad((logps * rollout.completion_mask[[3, 4, 5, 0, 1, 8]]).sum(), params)
        results.append((logps, grads))
    (shared, g_shared), (plain, g_plain) = results
    assert torch.allclose(shared, plain, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_shared, g_plain))


def test_gradient_checkpointing_runs_one_sequence_per_row():
    """Checkpointed layers drop the cache when gradients are on, so the shared-prompt pass must not be used."""
    model, tok = _tiny(seed=2)
    ro = HFEngine(model, tok, seed=1).generate(["5+5\n", "12-3+4\n"], n=3, max_new_tokens=8, temperature=1.0)
    want = completion_logps(model, ro, torch.arange(6), temperature=1.0).detach()
    model.gradient_checkpointing_enable()
    model.train()
    got = completion_logps(model, ro, torch.arange(6), temperature=1.0)
    assert got.requires_grad and torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # no gradients: the cache is kept and the prompts are shared again
        assert torch.allclose(completion_logps(model, ro, torch.arange(6), temperature=1.0), want, atol=1e-5)


def test_sampling_is_seeded():
    model, tok = _tiny()
    a = HFEngine(model, tok, seed=3).generate(["2+2\n"], n=4, max_new_tokens=8, temperature=1.0)
    b = HFEngine(model, tok, seed=3).generate(["2+2\n"], n=4, max_new_tokens=8, temperature=1.0)
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
        reloaded, tok2 = load_policy(OmegaConf.structured(ModelConfig(path=d)))
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
    ids, mask = sample(gpt2, enc.input_ids, enc.attention_mask, **kw)  # the model's own forward
    assert ids.shape[0] == 4 and mask.shape == ids.shape
