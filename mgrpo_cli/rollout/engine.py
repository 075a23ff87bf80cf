"""Batched sampling with a KV cache, and the rollout engine interface.

``sample`` prefills each distinct prompt once, repeats its cache n times, then decodes one token per
step for every row of the batch; rows that have emitted a stop token write padding. Every ``check_every``
steps the loop looks at how many rows still run (the only host synchronisation of the loop: on a
GPU the steps in between are queued without waiting) and stops when none does, or shrinks the batch
to the smallest of a few fixed sizes that holds the running rows (:func:`batch_buckets`: the first
batch size and the powers of two and three halves of powers of two below it), filled up with
finished rows. So a step costs about what the still-running rows cost, the cache is copied only at
those few sizes, and the decode step sees few distinct shapes (what compiled or captured steps need).
Greedy when temperature is 0. It never calls ``model.generate``: the test suite checks that its greedy
tokens equal ``model.generate``'s.

A row stops at the first of its stop tokens (:func:`stop_token_ids`: every token that ends the model's turn);
a ``Rollout`` also marks the rows its budget cut off (``truncated``: no stop token at the end); ``groups``
and ``concat_rollouts`` pick groups out of rollouts and put rollouts together (dynamic sampling).

Engines: ``HFEngine`` (this loop on the training policy itself). Another engine (e.g. vLLM) would
implement the same ``RolloutEngine.generate`` signature.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from mgrpo_cli.rollout.decode import LeanDecoder, lean_supported


@dataclass
class Rollout:
    """n completions for each of several prompts, rows grouped by prompt (prompt i -> rows i*n..i*n+n-1)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded with pad
    completion_mask: torch.Tensor  # (B, C) 1 for generated tokens, the stop token included
    texts: list[str]  # decoded completions up to their stop token (excluded), special tokens removed
    n: int  # completions per prompt (the group size)
    truncated: Optional[torch.Tensor] = None  # (B,) bool: cut off by the token budget (no stop token); None = none
    # (B, C) float32: each completion token's log-prob under the distribution the sampler drew it from
    # (the softmax at the temperature of the logits it was drawn from, before top-k/top-p/min-p), 0 on
    # padding; None = not recorded (greedy)
    sampling_logps: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.truncated is None:
            self.truncated = torch.zeros(self.completion_ids.shape[0], dtype=torch.bool,
                                         device=self.completion_ids.device)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def groups(self, keep: Sequence[int]) -> Rollout:
        """The rows of groups ``keep`` (in that order), padding shared by all of them trimmed."""
        rows = torch.tensor([g * self.n + i for g in keep for i in range(self.n)], dtype=torch.long,
                            device=self.prompt_ids.device)
        trimmed = trim_shared_padding(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                                      self.completion_mask[rows])
        logps = None if self.sampling_logps is None else self.sampling_logps[rows][:, :trimmed[2].shape[1]]
        return Rollout(*trimmed, [self.texts[r] for r in rows.tolist()], self.n, self.truncated[rows], logps)


IM_END = "<|im_end|>"  # ChatML's end of turn (Qwen)


def stop_token_ids(tokenizer, generation_eos: int | Sequence[int] | None, chat: bool) -> tuple[int, ...]:
    """Every token that ends the model's turn: the tokenizer's EOS, the generation config's
    ``eos_token_id`` (an id or a list, as Qwen2.5-Instruct ships ``[151645, 151643]``), and, for prompts
    rendered by the chat template, ``<|im_end|>`` when the tokenizer has it as an added token (a base
    model such as Qwen2.5-Math ends its chat turn with it while its EOS is ``<|endoftext|>``)."""
    ids = [tokenizer.eos_token_id]
    ids += [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or ())
    if chat and IM_END in tokenizer.get_added_vocab():
        ids.append(tokenizer.get_added_vocab()[IM_END])
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _as_ids(stop: int | Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([stop] if isinstance(stop, int) else list(stop), dtype=torch.long, device=device)


def truncated_rows(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B, C) right-padded completions -> (B,) bool: rows whose last token is not a stop token
    (``eos_token_id``: one id or several).

    Sampling stops a row at a stop token or at its token budget, so these are the rows cut off by the
    budget (DAPO's overlong completions); an empty row is not truncated."""
    lengths = completion_mask.sum(-1)
    if completion_ids.shape[-1] == 0:
        return torch.zeros_like(lengths, dtype=torch.bool)
    last = completion_ids.gather(-1, (lengths - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lengths > 0) & ~torch.isin(last, _as_ids(eos_token_id, last.device))


def trim_shared_padding(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows without the padding all of them share: the prompts' left columns that are padding in
    every row, the completions' right columns past the longest completion."""
    left = int((prompt_mask.sum(0) == 0).sum()) if len(prompt_mask) else 0
    width = int(completion_mask.sum(-1).max()) if len(completion_mask) else 0
    return prompt_ids[:, left:], prompt_mask[:, left:], completion_ids[:, :width], completion_mask[:, :width]


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int = 0) -> Rollout:
    """The rows of rollouts of one group size, in order: prompts left-padded and completions right-padded
    to the widest part with ``pad_token_id`` (masked out)."""
    if len({r.n for r in parts}) != 1:
        raise ValueError(f"concat_rollouts: parts have different group sizes {[r.n for r in parts]}")
    p_width = max(r.prompt_ids.shape[1] for r in parts)
    c_width = max(r.completion_ids.shape[1] for r in parts)

    def pad(t: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
        extra = t.new_full((t.shape[0], width - t.shape[1]), value)
        return torch.cat([extra, t] if left else [t, extra], 1)

    logps = None
    if all(r.sampling_logps is not None for r in parts):
        logps = torch.cat([pad(r.sampling_logps, c_width, False, 0) for r in parts])
    return Rollout(torch.cat([pad(r.prompt_ids, p_width, True, pad_token_id) for r in parts]),
                   torch.cat([pad(r.prompt_mask, p_width, True, 0) for r in parts]),
                   torch.cat([pad(r.completion_ids, c_width, False, pad_token_id) for r in parts]),
                   torch.cat([pad(r.completion_mask, c_width, False, 0) for r in parts]),
                   [t for r in parts for t in r.texts], parts[0].n, torch.cat([r.truncated for r in parts]), logps)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty (as transformers' ``RepetitionPenaltyLogitsProcessor``): the logits of the
    tokens already ``seen`` (in the prompt or the completion so far; (B, V) bool) are divided by
    ``penalty`` where positive and multiplied by it where negative, so penalty > 1 makes them less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: Optional[float] = None) -> torch.Tensor:
    """(B, V) probabilities with the tokens the filters drop set to 0 (not renormalised): ``top_k`` keeps
    the k most likely (0 = all), ``top_p`` the smallest most-likely set whose mass reaches top_p, ``min_p``
    those at least min_p x the most likely token's probability; applied in that order, each to what
    the one before kept (as transformers and vLLM order them)."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        mass = sorted_p.sum(-1, keepdim=True) if top_k > 0 else 1.0  # what top-k left
        drop = sorted_p.cumsum(-1) - sorted_p > top_p * mass
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator, top_k: int = 0,
          min_p: Optional[float] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, V) logits -> (B,) token ids and (B,) float32 their log-probs under the temperature's full
    softmax (before the filters); greedy (temperature 0): no log-probs."""
    if temperature <= 0:
        return logits.argmax(-1), None
    full = torch.softmax(logits.float() / temperature, dim=-1)
    probs = filter_probs(full, top_k, top_p, min_p)
    # Gumbel-max with exponential noise: argmax(p / E), E ~ Exp(1), draws i with probability p_i
    # (torch.multinomial does the same, with a slower exponential sampler on CPU)
    noise = -torch.rand(probs.shape, generator=generator, device=probs.device).log()
    picked = (probs / noise).argmax(-1)
    return picked, full.gather(-1, picked.unsqueeze(-1)).squeeze(-1).log()


# steps between looks at the finished rows on an asynchronous device (each look waits for the GPU);
# on the CPU every step looks, as waiting costs nothing there
CHECK_EVERY = 8


def batch_buckets(rows: int) -> list[int]:
    """The batch sizes decoding may shrink to, largest first: ``rows`` and every 2^k and 3 * 2^(k-1)
    below it (so a drop leaves at least three quarters of the batch, as each drop copies the cache)."""
    sizes = {rows}
    k = 1
    while k < rows:
        sizes.add(k)
        if k * 3 // 2 < rows and k > 1:
            sizes.add(k * 3 // 2)
        k *= 2
    return sorted(sizes, reverse=True)


def bucket_for(running: int, buckets: list[int]) -> int:
    """The smallest of ``buckets`` that holds ``running`` rows."""
    return min(b for b in buckets if b >= running)


class _ModelDecoder:
    """Decode steps through the model's own forward and a transformers ``DynamicCache`` (any model)."""

    def __init__(self, model, cache, prompt_mask: torch.Tensor, n: int, max_new_tokens: int):
        self.model, self.cache = model, cache
        if n > 1:
            cache.batch_repeat_interleave(n)
        self.width = prompt_mask.shape[1]
        self.mask = None  # every step's attention mask at once: step t reads the first width + t + 1 columns
        if not bool(prompt_mask.all()):  # without padding no step needs an attention mask
            rows = prompt_mask.shape[0] * n
            self.mask = torch.cat([prompt_mask.repeat_interleave(n, 0), prompt_mask.new_ones(rows, max_new_tokens)], 1)

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        if self.mask is not None:
            self.mask = self.mask[keep]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        mask = None if self.mask is None else self.mask[:, :self.width + t + 1]
        out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=positions.unsqueeze(-1),
                         cache=self.cache, use_cache=True)
        return out.logits[:, -1]


@torch.inference_mode()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, n: int = 1,
           max_new_tokens: int, eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None,
           lean: bool = True, check_every: Optional[int] = None,
           static: bool = False, top_k: int = 0, min_p: Optional[float] = None,
           repetition_penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Sample n completions per prompt. (U, P) distinct left-padded prompts -> (U*n, C) ids, mask and
    float32 sampling log-probs: each token's under the temperature's softmax of the logits it was drawn
    from (after the repetition penalty, before the top-k/top-p/min-p filters), 0 on padding; None when
    greedy. Recording them draws nothing: the tokens are those of a run that does not look at them.
    A row ends at the first of its ``eos_token_id`` (one id or several, as in ``model.generate``).

    ``top_k``, ``top_p``, ``min_p`` filter the distribution (:func:`filter_probs`); a
    ``repetition_penalty`` other than 1 penalises each row's tokens seen so far (prompt and completion,
    :func:`penalize_repeats`), greedy decoding included.

    ``lean``: decode with :class:`~mgrpo_cli.rollout.decode.LeanDecoder` where the model supports it (``static``:
    its fixed-shape step, see there). ``check_every``: steps between looks at the finished rows
    (default: 1 on the CPU, :data:`CHECK_EVERY` elsewhere)."""
    from transformers import DynamicCache

    device = prompt_ids.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
    cache = DynamicCache(config=model.config)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=None if bool(prompt_mask.all()) else prompt_mask,
                position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].repeat_interleave(n, 0)  # (U*n, V)
    next_pos = position_ids[:, -1].repeat_interleave(n, 0) + 1  # (B,)
    if lean and lean_supported(model):
        decoder = LeanDecoder(model, cache, prompt_mask, n, max_new_tokens, int(next_pos.max()) + max_new_tokens,
                              static=static)
    else:
        decoder = _ModelDecoder(model, cache, prompt_mask, n, max_new_tokens)
    rows = prompt_ids.shape[0] * n
    seen = None  # (b, V) bool: each batch row's tokens so far, for the repetition penalty
    if repetition_penalty != 1.0:
        counts = torch.zeros(prompt_ids.shape[0], logits.shape[-1], dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, prompt_ids, prompt_mask.long()).gt(0).repeat_interleave(n, 0)
    buckets = batch_buckets(rows)
    stops = _as_ids(eos_token_id, device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device) if temperature > 0 else None
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # which output rows the batch rows are
    running = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows that have not emitted a stop token
    length = lengths.clone()  # (b,) completion length of each batch row (max_new_tokens while running)
    for t in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        nxt, logp = _pick(logits, temperature, top_p, generator, top_k, min_p)  # (b,), (b,) or None
        if logps is not None:
            logps[live, t] = logp.masked_fill(~running, 0.0)
        if seen is not None:
            seen[torch.arange(nxt.shape[0], device=device), nxt] = True
        finished = running & torch.isin(nxt, stops)
        nxt = torch.where(running, nxt, pad_token_id)  # finished rows write padding
        tokens[live, t] = nxt
        # looking at every step (the CPU), only a step where a row finished changes anything
        changed = check_every > 1 or bool(finished.any())
        if changed:
            length.masked_fill_(finished, t + 1)
            running.logical_xor_(finished)  # finished rows were running: this clears them
        if t == max_new_tokens - 1:
            break
        if changed and (t + 1) % check_every == 0:
            still = int(running.sum())
            if still == 0:
                break
            size = bucket_for(still, buckets)
            if size < running.numel():  # running rows first, then finished ones up to the bucket's size
                keep = torch.argsort((~running).to(torch.uint8), stable=True)[:size].sort().values
                lengths[live] = length
                live, nxt, next_pos, running, length = live[keep], nxt[keep], next_pos[keep], running[keep], length[keep]
                if seen is not None:
                    seen = seen[keep]
                decoder.select(keep)
        logits = decoder.step(nxt, next_pos, t)
        next_pos = next_pos + 1
    lengths[live] = length
    width = int(lengths.max().item()) if rows else 0
    tokens = tokens[:, :width]
    completion_mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return tokens, completion_mask, None if logps is None else logps[:, :width]


@dataclass(frozen=True)
class Sampling:
    """How a training rollout samples (the ``grpo.*`` keys of the same names): the temperature and the
    filters of :func:`filter_probs` (``top_k`` 0 = all, ``min_p`` None = off; ``repetition_penalty``
    1 = off), as ``RolloutEngine.generate`` takes them (``**sampling.kwargs()``)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: Optional[float]
    repetition_penalty: float

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty}


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, min_p: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> Rollout: ...

    def reseed(self, seed: int) -> None: ...


class HFEngine:
    """The default engine: :func:`sample` on the training policy itself (no weight sync needed)."""

    def __init__(self, model, tokenizer, *, max_prompt_length: int, seed: int = 0, stop_at_eos: bool = True,
                 stop_ids: Optional[Sequence[int]] = None, rollout_dtype: Optional[torch.dtype] = None):
        self.model, self.tokenizer = model, tokenizer
        # sample under torch.autocast to this dtype (the matmuls in it, as a bf16 inference engine runs
        # them) while the weights and the training passes keep theirs; None = the model's own precision
        self.rollout_dtype = rollout_dtype
        self.max_prompt_length = max_prompt_length
        # the rows' stop tokens (stop_token_ids; None = the tokenizer's EOS); stop_at_eos=False: every
        # completion runs to max_new_tokens (benchmarks compare equal lengths)
        self.eos_token_id = (tuple(stop_ids) if stop_ids else (tokenizer.eos_token_id,)) if stop_at_eos else (-1,)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the sampling noise from ``seed`` (on CUDA the noise comes from torch's global CUDA
        generator, which :func:`mgrpo_cli.training.seeding.seed_step` seeds)."""
        self.generator.manual_seed(seed)

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
                 top_p: float = 1.0, top_k: int = 0, min_p: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> Rollout:
        prompt_ids, prompt_mask = self.encode(prompts)
        was_training = self.model.training
        self.model.eval()
        precision = (torch.autocast(self.device.type, dtype=self.rollout_dtype) if self.rollout_dtype is not None
                     else contextlib.nullcontext())
        try:
            gen = self.generator if self.device.type == "cpu" else None
            with precision:
                ids, mask, logps = sample(self.model, prompt_ids, prompt_mask, n=n, max_new_tokens=max_new_tokens,
                                          eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                          temperature=temperature, top_p=top_p, generator=gen, top_k=top_k,
                                          min_p=min_p, repetition_penalty=repetition_penalty)
        finally:
            self.model.train(was_training)
        truncated = truncated_rows(ids, mask, self.eos_token_id)
        # each row's text ends before its stop token, which may be an ordinary token of the vocabulary
        lengths = mask.sum(-1)
        ends = (lengths - (~truncated & (lengths > 0)).long()).tolist()
        texts = self.tokenizer.batch_decode([row[:end] for row, end in zip(ids.tolist(), ends, strict=True)],
                                            skip_special_tokens=True)
        return Rollout(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0),
                       ids, mask, texts, n, truncated, logps)
