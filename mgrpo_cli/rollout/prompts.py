"""Prompt rendering for every layer: the first attempt and each correction turn.

A layer-k input is the problem plus the earlier turns, each a (response, guiding phrase) pair:
- ``continue`` (the default, R1-style re-thinking): layer-1 prompt + response + phrase, all in the same
  assistant turn, and the model goes on writing after the phrase;
- ``new_turn``: the response closes the assistant turn and a user turn asks for a review, quoting
  the phrase.
``chat`` uses the tokenizer's chat template with a system prompt (Qwen2.5-Math style by default);
``plain`` (the embedded tiny model) is the question and a newline.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PLAIN_TEMPLATE = "{question}\n"

Turn = tuple[str, str]  # (response, guiding phrase)


@dataclass(frozen=True)
class PromptRenderer:
    tokenizer: object
    template: str  # plain | chat
    system_prompt: str
    input_mode: str  # continue | new_turn
    phrase_template: str  # how a guiding phrase follows a response (continue)
    new_turn_prompt: str  # the user turn asking for a review (new_turn)

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
