"""Prompt rendering for every layer: the first attempt and each correction turn.

A layer-k input is the problem plus the earlier turns, each a (response, guiding phrase) pair:
- ``continue`` (the default, R1-style re-thinking): layer-1 prompt + response + phrase, all in the same
  assistant turn, and the model goes on writing after the phrase;
- ``new_turn``: the response closes the assistant turn and a user turn asks for a review, quoting
  the phrase.
``chat`` uses the tokenizer's chat template with a system prompt (Qwen2.5-Math style by default);
``plain`` (the embedded tiny model) is the question and a newline.

Budgets never cut the head of a prompt (system prompt, question). A question whose prompt is longer
than ``max_prompt_length`` tokens is left out by the caller (:meth:`PromptRenderer.fits`, verl's
``filter_overlong_prompts``); a correction prompt longer than ``max_correction_prompt_length`` has its
earlier answers shortened from their start, oldest first, keeping their end (where the final answer
is) behind :data:`CUT_MARK` (:meth:`PromptRenderer.fit`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

PLAIN_TEMPLATE = "{question}\n"
CUT_MARK = "[...] "  # where a shortened earlier answer begins

Turn = tuple[str, str]  # (response, guiding phrase)


@dataclass(frozen=True)
class PromptRenderer:
    tokenizer: object
    template: str  # plain | chat
    system_prompt: str
    input_mode: str  # continue | new_turn
    phrase_template: str  # how a guiding phrase follows a response (continue)
    new_turn_prompt: str  # the user turn asking for a review (new_turn)
    max_prompt_length: Optional[int] = None  # a question's prompt budget in tokens; None = any length
    max_correction_prompt_length: Optional[int] = None  # a correction prompt's budget; None = any length

    def length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fits(self, questions: Sequence[str]) -> list[bool]:
        """Whether each question's prompt is within ``max_prompt_length`` (else the caller skips it)."""
        if self.max_prompt_length is None or not questions:
            return [True] * len(questions)
        ids = self.tokenizer([self.render(q) for q in questions], add_special_tokens=False)["input_ids"]
        return [len(row) <= self.max_prompt_length for row in ids]

    def fit(self, question: str, turns: Sequence[Turn] = ()) -> tuple[str, bool]:
        """(the prompt of :meth:`render` within ``max_correction_prompt_length``, whether an answer was cut).

        Each earlier answer, oldest first, loses tokens from its start until the prompt fits; what is
        left follows :data:`CUT_MARK`. The system prompt, the question and the phrases are never cut
        (``config.rules`` keeps the correction budget above the question's)."""
        text = self.render(question, turns)
        budget = self.max_correction_prompt_length
        if not turns or budget is None or (over := self.length(text) - budget) <= 0:
            return text, False
        turns = list(turns)
        for i, (response, phrase) in enumerate(turns):
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            drop = 0
            while over > 0 and drop < len(ids):
                drop = min(len(ids), drop + over)
                kept = self.tokenizer.decode(ids[drop:], skip_special_tokens=True).lstrip("\ufffd")
                turns[i] = (CUT_MARK + kept, phrase)
                text = self.render(question, turns)
                over = self.length(text) - budget
            if over <= 0:
                break
        return text, True

    def _chat(self, messages: list[dict]) -> str:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, question: str, turns: Sequence[Turn] = ()) -> str:
        """The text the model continues for a question after ``turns`` earlier attempts."""
        if self.input_mode == "continue":
            head = (PLAIN_TEMPLATE.format(question=question) if self.template == "plain"
                    else self._chat([{"role": "user", "content": question}]))
            return head + "".join(r + self.phrase_template.format(phrase=p) for r, p in turns)
        if self.template == "plain":
            text = PLAIN_TEMPLATE.format(question=question)
            for response, phrase in turns:
                text += response + "\n" + self.new_turn_prompt.format(phrase=phrase) + "\n"
            return text
        messages = [{"role": "user", "content": question}]
        for response, phrase in turns:
            messages += [{"role": "assistant", "content": response},
                         {"role": "user", "content": self.new_turn_prompt.format(phrase=phrase)}]
        return self._chat(messages)
