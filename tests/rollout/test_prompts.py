"""Prompt budgets never cut the head of a prompt: a correction prompt shortens its earlier answer from the
start (keeping the end, where the final answer is); a question over its budget is skipped, never cut."""
import pytest
from conftest import SMALL, compose

from mgrpo_cli.algo.layers import LayerInput, run_layer
from mgrpo_cli.cli import build
from mgrpo_cli.data.problems import Problem
from mgrpo_cli.errors import UserError
from mgrpo_cli.models.loading import load_policy
from mgrpo_cli.rollout.prompts import CUT_MARK

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
SYSTEM = "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen_math(qwen25):
    cfg = compose("train", SMALL + ["model=qwen1.5b", f"model.path={qwen25('math')}", "model.dtype=float32",
                                    "model.gradient_checkpointing=false", "model.max_prompt_length=64",
                                    "model.max_correction_prompt_length=160", "model.max_completion_length=8",
                                    "layer.phrases=[Wait, let me double-check that.]"])
    policy, tok = load_policy(build.model_spec(cfg.model))
    return cfg, policy, tok


def test_a_long_first_answer_is_shortened_from_its_start_and_the_question_kept(qwen_math):
    cfg, policy, tok = qwen_math
    renderer = build.renderer(cfg, tok, policy)
    answer = " ".join(f"Step {i}: 48 / 2 = 24." for i in range(200)) + " So the answer is \\boxed{72}."
    text, cut = renderer.fit(QUESTION, ((answer, "Wait, let me double-check that."),))
    assert cut and renderer.length(text) <= 160
    assert text.startswith(SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{CUT_MARK}")
    assert text.endswith("So the answer is \\boxed{72}.\nWait, let me double-check that.\n")
    short = "48 / 2 = 24, 48 + 24 = 72. \\boxed{72}"  # within the budget: unchanged
    assert renderer.fit(QUESTION, ((short, "Hmm."),)) == (renderer.render(QUESTION, ((short, "Hmm."),)), False)
    assert renderer.fits([QUESTION, QUESTION * 4]) == [True, False]


def test_a_correction_layer_counts_its_cut_prompts(qwen_math):
    cfg, policy, tok = qwen_math
    renderer, engine = build.renderer(cfg, tok, policy), build.engine(cfg, policy, tok)
    spec = build.layer_specs(cfg)[1]
    long_answer = " ".join(f"Step {i}." for i in range(300))
    inputs = [LayerInput(0, ((long_answer, "Wait, let me double-check that."),), False),
              LayerInput(0, (("\\boxed{72}", "Wait, let me double-check that."),), True)]
    problems = [Problem("p0", QUESTION, "72")]
    result = run_layer(engine, renderer, build.reward(cfg), problems, inputs, spec, build.sampling(cfg),
                       build.advantages(cfg))
    assert result.metrics["prompts_cut"] == 1.0
    assert int(result.rollout.prompt_mask[0].sum()) <= 160


def test_the_correction_prompt_budget_holds_the_question_budget():
    cfg = compose("train", SMALL + ["model.max_prompt_length=64", "model.max_correction_prompt_length=64"])
    from mgrpo_cli.config import rules

    with pytest.raises(UserError, match="model.max_correction_prompt_length=64"):
        rules.check(cfg)


def test_training_and_held_out_questions_over_the_budget_are_skipped(caplog):
    """verl's filter_overlong_prompts: a question longer than model.max_prompt_length leaves the training pool
    and the held-out set whole (logged), never cut; a pool with nothing left is the one-line error."""
    from mgrpo_cli.data.problems import ProblemStream
    from mgrpo_cli.models.tiny import build_byte_tokenizer

    cfg = compose("train", SMALL + ["model.max_prompt_length=16"])
    tok = build_byte_tokenizer()
    model = build.policy(cfg)[0]
    renderer = build.renderer(cfg, tok, model)
    short, long = Problem("a", "1+2=", "3"), Problem("b", "1+2+3+4+5+6+7+8+9=", "45")
    data = build.Data(ProblemStream(2, 0, pool=[short, long, short]), [long, short])
    assert build.without_overlong(data, renderer, 16) == [short]
    assert data.stream.pool == [short, short]
    assert "skipped 1 training questions longer than model.max_prompt_length=16" in caplog.text
    with pytest.raises(UserError, match="model.max_prompt_length=16"):
        build.without_overlong(build.Data(ProblemStream(2, 0, pool=[long]), []), renderer, 16)
