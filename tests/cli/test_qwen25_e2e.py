"""The Qwen2.5 path end to end on CPU: `mgrpo train` and `mgrpo eval` on the offline Qwen2.5 fixture
(tests/qwen25.py: Qwen2.5's tokenizer, chat template and configs at the real vocabulary, a narrow random
network), for the base flavour (model=qwen1.5b, Qwen2.5-Math-1.5B) and the instruct one (model=qwen0.5b)."""
import json

import pytest
from conftest import requires_data, run_cli

# the run's system_prompt (Qwen2.5-Math's evaluation prompt) for both flavours
SYSTEM = "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
# a few steps of the real path: chat template, 2 layers, the loss at the real vocabulary; small budgets
COMMON = ["dataset=gsm8k", "logger=none", "model.dtype=float32", "trainer.threads=2", "model.max_prompt_length=256",
          "model.max_completion_length=12", "model.max_correction_length=12", "eval.batch_size=8"]


@pytest.mark.parametrize("model, flavour", [("qwen1.5b", "math"), ("qwen0.5b", "instruct")])
def test_train_then_eval_on_the_qwen25_fixture(qwen25, tmp_path, model, flavour):
    requires_data("gsm8k", "train.jsonl")
    folder = qwen25(flavour)
    out = tmp_path / "train"
    r = run_cli("train", f"model={model}", f"model.path={folder}", "debug=fast", "eval.limit=4",
                "grpo.micro_batch_tokens=256", f"paths.outputs={out}", *COMMON, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    export = next(out.rglob("export"))
    ev = run_cli("eval", f"model={model}", f"model.path={export}", "eval.limit=6", f"paths.outputs={tmp_path / 'eval'}",
                 *COMMON, timeout=900)
    assert ev.returncode == 0, ev.stderr[-3000:]

    # the export reloads with transformers, its tokenizer is the fixture's (ids, added tokens, template)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(export)
    tok, original = AutoTokenizer.from_pretrained(export), AutoTokenizer.from_pretrained(folder)
    assert reloaded.config.vocab_size == 151936 and reloaded.config.tie_word_embeddings
    text = "Janet’s ducks lay 16 eggs.\n\n$2 per egg: \\boxed{18}<|im_end|>"
    assert tok(text)["input_ids"] == original(text)["input_ids"] and tok.decode(tok(text)["input_ids"]) == text
    assert (tok.eos_token_id, tok.chat_template) == (original.eos_token_id, original.chat_template)

    records = [json.loads(line) for line in next((tmp_path / "eval").rglob("problems.jsonl")).read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        assert {"prompt", "completions", "t2_prompt", "t2_completion"} <= set(rec)
        # the t2 prompt starts with the system prompt and the question, then the first answer
        assert rec["prompt"] == f"{SYSTEM}<|im_start|>user\n{rec['question']}<|im_end|>\n<|im_start|>assistant\n"
        assert rec["t2_prompt"].startswith(rec["prompt"] + rec["completions"][0])
        for text in (*rec["completions"], rec["t2_completion"]):
            assert "<|im_end|>" not in text and "<|endoftext|>" not in text
