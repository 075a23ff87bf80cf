"""Batched sampling with a KV cache, and the rollout engine interface.

``sample`` prefills each distinct prompt once, repeats its cache n times, then decodes one token per
step for every unfinished row, dropping finished rows from the batch whenever they make up a quarter
of it (so a step costs about what the still-running rows cost, and the cache is not copied at every
EOS), and stops when every row has emitted EOS. Greedy when temperature is 0. It never calls ``model.generate``:
the test suite checks that its greedy tokens equal ``model.generate``'s.

Engines: ``hf`` (this loop on a transformers model, the default). A vLLM engine would implement the
same ``RolloutEngine.generate`` signature; it is not built here (no GPU on our machines).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class Rollout:
    """n completions for each of several prompts, rows grouped by prompt (prompt i -> rows i*n..i*n+n-1)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded with pad
    completion_mask: torch.Tensor  # (B, C) 1 for generated tokens, EOS included
    texts: list[str]  # decoded completions, special tokens removed
    n: int  # completions per prompt (the group size)

    @property
    def num_groups(self) -> int:
        return self.prompt_ids.shape[0] // self.n

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Gumbel-max with exponential noise: argmax(p / E), E ~ Exp(1), draws i with probability p_i
    # (torch.multinomial does the same, with a slower exponential sampler on CPU)
    noise = -torch.rand(probs.shape, generator=generator, device=probs.device).log()
    return (probs / noise).argmax(-1)


# finished rows leave the batch once they are this share of it (dropping copies the whole cache)
DROP_FINISHED_AT = 0.25


@torch.inference_mode()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, n: int = 1,
           max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample n completions per prompt. (U, P) distinct left-padded prompts -> (U*n, C) ids and mask."""
    from transformers import DynamicCache

    device = prompt_ids.device
    cache = DynamicCache(config=model.config)
    padded = not bool(prompt_mask.all())  # without padding no step needs an attention mask
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask if padded else None, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]  # (U, V)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
    rows, prompt_width = prompt_ids.shape[0] * n, prompt_ids.shape[1]
    # every step's attention mask at once: step t reads the first prompt_width + t + 1 columns
    mask = torch.cat([prompt_mask.repeat_interleave(n, 0), prompt_mask.new_ones(rows, max_new_tokens)], 1)
    next_pos = position_ids[:, -1].repeat_interleave(n, 0) + 1  # (B,)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # which output rows the batch rows are
    running = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows that have not emitted EOS
    for t in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_p, generator)  # (b,)
        finished = running & (nxt == eos_token_id)
        nxt = torch.where(running, nxt, pad_token_id)  # finished rows still in the batch write padding
        tokens[live, t] = nxt
        if finished.any():
            lengths[live[finished]] = t + 1
            running &= ~finished
            still = int(running.sum())
            if still == 0:
                break
            if still <= (1 - DROP_FINISHED_AT) * running.numel():
                keep = running.nonzero().squeeze(-1)
                live, nxt, mask, next_pos, running = live[keep], nxt[keep], mask[keep], next_pos[keep], running[keep]
                cache.batch_select_indices(keep)
        if t == max_new_tokens - 1:
            break
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask[:, :prompt_width + t + 1] if padded else None,
                    position_ids=next_pos.unsqueeze(-1), cache=cache, use_cache=True)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    width = int(lengths.max().item()) if rows else 0
    tokens = tokens[:, :width]
    completion_mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return tokens, completion_mask


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> Rollout: ...


class HFEngine:
    """The default engine: :func:`sample` on the training policy itself (no weight sync needed)."""

    def __init__(self, model, tokenizer, *, max_prompt_length: int = 4096, seed: int = 0, stop_at_eos: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length = max_prompt_length
        # False: every completion runs to max_new_tokens (benchmarks compare equal lengths)
        self.eos_token_id = tokenizer.eos_token_id if stop_at_eos else -1
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # over-long prompts lose their start, never the generation prompt at their end
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False,
                             truncation=True, max_length=self.max_prompt_length)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generate(self, prompts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> Rollout:
        prompt_ids, prompt_mask = self.encode(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            gen = self.generator if self.device.type == "cpu" else None
            ids, mask = sample(self.model, prompt_ids, prompt_mask, n=n, max_new_tokens=max_new_tokens,
                               eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                               temperature=temperature, top_p=top_p, generator=gen)
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Rollout(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0),
                       ids, mask, texts, n)


def build_engine(name: str, model, tokenizer, **kw) -> RolloutEngine:
    if name == "hf":
        return HFEngine(model, tokenizer, **kw)
    if name == "vllm":
        raise ValueError("rollout.engine=vllm is not built yet (it needs a GPU); use rollout.engine=hf")
    raise ValueError(f"rollout.engine: expected hf|vllm, got {name!r}")
