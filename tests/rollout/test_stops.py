"""Rows stop on every token that ends the model's turn, checked on the offline Qwen2.5 fixture.

The fixture (tests/qwen25.py) is Qwen2.5's real tokenizer, chat templates and configs around a narrow
random network whose ``<|im_end|>`` is likely enough to be written now and then.
"""
import pytest
import torch
from conftest import SMALL, compose
from omegaconf import OmegaConf

from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import ModelConfig
from mgrpo_cli.models.loading import load_policy
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rollout.engine import stop_token_ids, truncated_rows

ENDOFTEXT, IM_END = 151643, 151645


def _cfg(model: str, folder, *extra: str):
    return compose("train", SMALL + [f"model={model}", f"model.path={folder}", "model.dtype=float32",
                                     "model.gradient_checkpointing=false", *extra])


def test_the_tiny_models_stop_set_is_its_eos_alone():
    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(OmegaConf.structured(ModelConfig())), tok)
    assert stop_token_ids(tok, model.generation_config.eos_token_id, chat=False) == (tok.eos_token_id,)
    # the tiny tokenizer has a chat template but no <|im_end|>: a chat-rendered prompt changes nothing
    assert stop_token_ids(tok, model.generation_config.eos_token_id, chat=True) == (tok.eos_token_id,)
    assert build.engine(compose("train", SMALL), model, tok).eos_token_id == (tok.eos_token_id,)


@pytest.mark.parametrize("flavour, model, chat, plain", [
    ("math", "qwen1.5b", (ENDOFTEXT, IM_END), (ENDOFTEXT,)),
    ("instruct", "qwen0.5b", (IM_END, ENDOFTEXT), (IM_END, ENDOFTEXT)),
])
def test_the_stop_set_is_the_union_of_eos_generation_eos_and_im_end_for_chat_prompts(qwen25, flavour, model,
                                                                                     chat, plain):
    policy, tok = load_policy(build.model_spec(_cfg(model, qwen25(flavour)).model))
    assert build.engine(_cfg(model, qwen25(flavour)), policy, tok).eos_token_id == chat
    assert build.engine(_cfg(model, qwen25(flavour), "model.prompt_template=plain"), policy, tok).eos_token_id == plain


def test_truncated_means_no_stop_token_at_the_end():
    ids = torch.tensor([[5, IM_END, 0], [5, 6, ENDOFTEXT], [5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert truncated_rows(ids, mask, (ENDOFTEXT, IM_END)).tolist() == [False, False, True, False]
    assert truncated_rows(ids, mask, ENDOFTEXT).tolist() == [True, False, True, False]


def test_a_base_model_row_that_writes_im_end_stops_there(qwen25):
    """Qwen2.5-Math's EOS is <|endoftext|>; its chat turn ends with <|im_end|>: the row ends at the first
    <|im_end|>, its text holds nothing of it or after it, and it is not 'truncated'."""
    cfg = _cfg("qwen1.5b", qwen25("math"))
    policy, tok = load_policy(build.model_spec(cfg.model))
    assert tok.eos_token_id == ENDOFTEXT and policy.generation_config.eos_token_id == ENDOFTEXT
    engine, renderer = build.engine(cfg, policy, tok), build.renderer(cfg, tok, policy)
    prompts = [renderer.render(q) for q in ("What is 2+3?", "Natalia sold 48 clips. How many are left?")]
    ro = engine.generate(prompts, n=16, max_new_tokens=24, temperature=1.0)
    lengths = ro.completion_mask.sum(-1)
    stopped = ~ro.truncated
    assert stopped.any() and ro.truncated.any(), "the fixture should end some rows early and run others to the budget"
    for r in range(len(ro.texts)):
        row = ro.completion_ids[r, :lengths[r]].tolist()
        ends = [i for i, t in enumerate(row) if t in (ENDOFTEXT, IM_END)]
        if stopped[r]:
            assert ends == [len(row) - 1]  # the first stop token is the last token of the row
            assert ro.texts[r] == tok.decode(row[:-1], skip_special_tokens=True)
        else:
            assert ends == [] and len(row) == 24
        assert (ro.completion_ids[r, lengths[r]:] == tok.pad_token_id).all()
    # the same rows with the tokenizer's EOS alone (the old behaviour) run on past <|im_end|>
    engine.eos_token_id = (ENDOFTEXT,)
    engine.reseed(0)
    old = engine.generate(prompts, n=16, max_new_tokens=24, temperature=1.0)
    assert any(IM_END in old.completion_ids[r, :-1].tolist() for r in range(len(old.texts)))
