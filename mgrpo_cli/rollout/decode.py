"""One-token decode steps without transformers' per-call machinery, for Llama-family decoders.

A decode step of a small model is mostly overhead: transformers rebuilds masks and rotary angles,
walks its cache classes and grows every key/value tensor with ``torch.cat`` (a copy of the whole
cache per token). :class:`LeanDecoder` runs the same computation on a key/value buffer allocated
once for the whole generation: each layer's own norm, projection and MLP modules are called (so
LoRA adapters and any dtype apply as in the model's forward), rotary angles come from the model's
own rotary module once per generation, and attention is torch's ``scaled_dot_product_attention``
over the filled part of the buffer (grouped query heads read their key/value head in place). The prompt is still prefilled by the model's ``forward``.

``static=True`` makes every step of a batch size the same computation on the same shapes, which is
what ``torch.compile`` or a CUDA graph needs to replay a step: attention runs over the whole buffer
with a mask of the filled columns (zero-initialised, so unfilled columns hold no NaN), the new
key/value column is written with ``index_copy_`` at a step counter kept on the device. It attends to
every column at every step, so without compilation or capture it is slower than the default (same
tokens, tested).

Supported: Qwen2, Qwen3, Llama and Mistral layouts without sliding windows, unsharded. Anything
else uses the model's own forward (:func:`lean_supported` decides). The test suite checks that
greedy tokens and log-probs equal ``model.generate`` and a plain forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mgrpo_cli.models.loading import base_model

LLAMA_FAMILY = {"qwen2", "qwen3", "llama", "mistral"}


def lean_supported(model) -> bool:
    base = base_model(model)
    config = base.config
    if getattr(config, "model_type", None) not in LLAMA_FAMILY:
        return False
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return False
    if type(base).__name__.startswith("FSDP") or any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return False  # sharded parameters are gathered by hooks on the modules' forward
    inner = getattr(base, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    return inner is not None and all(hasattr(inner, a) for a in needed) and hasattr(base, "lm_head")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Decode state for B rows: key/value buffers (B, kv_heads, P + max_new_tokens, head_dim) per
    layer, filled with the prefill's ``cache`` (rows repeated ``n`` times) at columns 0..P-1."""

    def __init__(self, model, cache, prompt_mask: torch.Tensor, n: int, max_new_tokens: int, max_position: int,
                 static: bool = False):
        base = base_model(model)
        self.inner, self.lm_head = base.model, base.lm_head
        self.layers = list(self.inner.layers)
        self.static = static
        rows, width = prompt_mask.shape[0] * n, prompt_mask.shape[1]
        self.keys, self.values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (U, kv_heads, P, head_dim)
            new = k.new_zeros if static else k.new_empty
            kb = new(rows, k.shape[1], width + max_new_tokens, k.shape[3])
            vb = new(rows, v.shape[1], width + max_new_tokens, v.shape[3])
            kb[:, :, :width] = k.repeat_interleave(n, 0)
            vb[:, :, :width] = v.repeat_interleave(n, 0)
            self.keys.append(kb)
            self.values.append(vb)
        self.width = width
        # attention mask over the buffer (True = attend); None when no prompt is padded (dynamic steps)
        self.allowed = None
        if static or not bool(prompt_mask.all()):
            self.allowed = torch.cat([prompt_mask.bool().repeat_interleave(n, 0),
                                      prompt_mask.new_ones(rows, max_new_tokens, dtype=torch.bool)], 1)
        if static:
            self.col = torch.full((1,), width, dtype=torch.long, device=prompt_mask.device)  # the next column
            self.columns = torch.arange(width + max_new_tokens, device=prompt_mask.device)
        dtype = self.keys[0].dtype
        positions = torch.arange(max_position, device=prompt_mask.device).unsqueeze(0)
        cos, sin = self.inner.rotary_emb(self.keys[0][:1, 0, :1].to(dtype), positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_position, head_dim)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only batch rows ``keep`` (finished rows leave the batch)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        if self.allowed is not None:
            self.allowed = self.allowed[keep]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token ``t`` of the completion, (b,) ids at (b,) rotary positions -> (b, V) next-token logits.
        A static decoder writes at its own step counter ``self.col`` instead of ``t`` (steps come in order)
        and attends over the whole buffer, so every tensor keeps its shape from one step to the next."""
        b = tokens.shape[0]
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (b, 1, 1, D)
        if self.static:
            end = None
            mask = (self.allowed & (self.columns <= self.col))[:, None, None, :]  # (b, 1, 1, width + max_new)
        else:
            col = self.width + t
            end = col + 1
            mask = None if self.allowed is None else self.allowed[:, None, None, :end]  # (b, 1, 1, col + 1)
        h = self.inner.embed_tokens(tokens)[:, None]  # (b, 1, hidden)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, 1, -1, attn.head_dim)
            k = attn.k_proj(x).view(b, 1, -1, attn.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, -1, attn.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if self.static:
                self.keys[i].index_copy_(2, self.col, k)
                self.values[i].index_copy_(2, self.col, v)
            else:
                self.keys[i][:, :, col] = k[:, :, 0]
                self.values[i][:, :, col] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, self.keys[i][:, :, :end], self.values[i][:, :, :end],
                                               attn_mask=mask, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if self.static:
            self.col += 1
        return self.lm_head(self.inner.norm(h))[:, 0]
