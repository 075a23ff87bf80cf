"""completion_logps through the chunked lm_head path: the log-probs and gradients of the whole-logits path."""
import pytest
import torch

from mgrpo_cli import grpo, loss
from mgrpo_cli.loss import CHUNKED_VOCAB, completion_logps, output_weight
from mgrpo_cli.rollout import Rollout


def _qwen2(vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


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
    model = _qwen2(vocab).train()
    if layout == "checkpointing":
        model.gradient_checkpointing_enable()
    ro = _rollout(vocab)
    rows = torch.tensor([3, 4, 5, 0, 1, 6, 7, 8])  # runs of one group: the shared-prompt pass
    calls = []
    chunked_fn = grpo.chunked_selective_log_softmax
    monkeypatch.setattr(grpo, "chunked_selective_log_softmax", lambda *a, **k: calls.append(1) or chunked_fn(*a, **k))
    kw = {"share_prompts": layout != "per_row"}
    auto = _logps_and_grads(model, ro, rows, **kw)
    assert bool(calls) == (vocab >= CHUNKED_VOCAB)  # the default: chunked for large vocabularies only
    chunked = _logps_and_grads(model, ro, rows, chunked=True, **kw)
    whole = _logps_and_grads(model, ro, rows, chunked=False, **kw)
    for got in (auto, chunked):
        assert torch.allclose(got[0], whole[0], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(got[1], whole[1]))
    with torch.no_grad():  # the reference's pass (prompts shared even with checkpointing: padding differs)
        mask = ro.completion_mask[rows].bool()
        ref = completion_logps(model, ro, rows, 0.7, chunked=True, **kw)
        assert torch.allclose(ref[mask], whole[0][mask], atol=1e-5)


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
