"""Hardware bounds of decoding and of the loss pass: bytes and FLOPs from a model's shapes (for gpu_check.py).

Pure arithmetic, no torch. For a Llama-family decoder (``ModelShape``: hidden h, intermediate i,
L layers, H query heads, K key/value heads of width d, vocabulary V) one token costs

    matmul FLOPs  = 2 * (L * (h*H*d + 2*h*K*d + H*d*h + 3*h*i) + V*h)     (lm_head included)
    attention     = 4 * L * H * d  per (query, key) pair                   (q.k and p.v, 2 FLOPs a MAC)

Embedding lookups, norms, biases, rotary angles and softmax are left out (under 1% at 1.5B).

A **decode step** (``batch`` rows, each attending ``context`` positions) reads every weight once
(the lm_head matrix is the embedding when they are tied; the embedding rows looked up are counted
too) and each row's keys and values: ``batch * context * 2 * L * K * d`` elements. Activations and
the new key/value writes are left out, so the byte count is a lower bound and so is the time.
A step can go no faster than ``max(bytes / bandwidth, FLOPs / peak)``: at batch 256 and Qwen2.5-1.5B
shapes the bytes decide.

The **loss pass** is the policy's forward and backward (backward = 2 x forward FLOPs) plus, with a KL
term, the reference's forward, laid out as :func:`mgrpo_cli.algo.loss.completion_logps` runs them. MFU is the model FLOPs over (seconds x dense bf16 peak): recomputation
by gradient checkpointing is not counted, as in the PaLM paper's definition.

``GPUS`` holds the datasheet memory bandwidth and dense (no sparsity) bf16 tensor peak of common
GPUs; ``gpu_spec`` picks one by ``torch.cuda.get_device_name()`` or takes explicit numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that set its bytes and FLOPs (``from_config`` reads a HF config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True  # lm_head shares the embedding matrix
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its ``config.json`` dict."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        kind = get("model_type", "qwen2")
        return cls(hidden=hidden, intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
                   heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(get("head_dim") or hidden // heads), vocab=int(get("vocab_size")),
                   tied=bool(get("tie_word_embeddings", False)),
                   qkv_bias=bool(get("attention_bias", kind == "qwen2")))


def layer_matmul_params(s: ModelShape) -> int:
    """Weights of one layer's projections (q, k, v, o and the gated MLP)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return s.hidden * q + 2 * s.hidden * kv + q * s.hidden + 3 * s.hidden * s.intermediate


def parameters(s: ModelShape) -> int:
    """Every parameter: embedding, layers (projections, biases, two norms), final norm, lm_head if untied."""
    bias = (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 0
    per_layer = layer_matmul_params(s) + bias + 2 * s.hidden
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * per_layer + s.hidden


def kv_elements_per_position(s: ModelShape) -> int:
    """Key and value elements one position holds over all layers."""
    return 2 * s.layers * s.kv_heads * s.head_dim


def forward_flops(s: ModelShape, tokens: int, logit_tokens: int, attended_pairs: int) -> int:
    """FLOPs of a forward pass over ``tokens`` tokens, ``logit_tokens`` of which go through lm_head,
    with ``attended_pairs`` (query, key) pairs summed over the sequences."""
    return (2 * s.layers * layer_matmul_params(s) * tokens + 2 * s.vocab * s.hidden * logit_tokens
            + 4 * s.layers * s.heads * s.head_dim * attended_pairs)


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over ``length`` positions."""
    return length * (length + 1) // 2


def decode_step_bytes(s: ModelShape, batch: int, context: int, weight_bytes: int = 2, kv_bytes: int = 2) -> int:
    """Bytes one decode step must read: all weights (the embedding only as the rows looked up, unless
    it is also the lm_head) and ``batch * context`` positions of keys and values."""
    weights = parameters(s) - (0 if s.tied else s.vocab * s.hidden) + (batch * s.hidden if not s.tied else 0)
    return weights * weight_bytes + batch * context * kv_elements_per_position(s) * kv_bytes


def decode_step_flops(s: ModelShape, batch: int, context: int) -> int:
    """FLOPs of one decode step: ``batch`` new tokens, each attending ``context`` positions."""
    return forward_flops(s, batch, batch, batch * context)


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, datasheet
    peak_flops: float  # dense bf16 tensor FLOP/s, datasheet (no sparsity)


# (name, what torch.cuda.get_device_name() contains, bandwidth TB/s, dense bf16 TFLOP/s); first match wins
GPUS = [
    ("H200 NVL", ("H200 NVL",), 4.8, 835.0),
    ("H200 SXM", ("H200",), 4.8, 989.4),
    ("H100 NVL", ("H100 NVL",), 3.9, 835.0),
    ("H100 PCIe", ("H100 PCIe",), 2.0, 756.0),
    ("H100 SXM", ("H100",), 3.35, 989.4),
    ("A100 80GB PCIe", ("A100 80GB PCIe",), 1.935, 312.0),
    ("A100 SXM 80GB", ("A100-SXM4-80GB", "A100-SXM-80GB"), 2.039, 312.0),
    ("A100 40GB", ("A100",), 1.555, 312.0),
    ("L40S", ("L40S",), 0.864, 362.1),
]


def gpu_spec(device_name: str, bandwidth: Optional[float] = None, peak_tflops: Optional[float] = None) -> GPU:
    """The table's entry for ``device_name``, with ``bandwidth`` (TB/s) / ``peak_tflops`` overriding it.
    Unknown names need both numbers."""
    for name, parts, tbs, tflops in GPUS:
        if any(p in device_name for p in parts):
            return GPU(name, (bandwidth or tbs) * 1e12, (peak_tflops or tflops) * 1e12)
    if bandwidth is None or peak_tflops is None:
        known = ", ".join(g[0] for g in GPUS)
        raise ValueError(f"GPU {device_name!r} is not in the table ({known}): "
                         "give --bandwidth TB/s and --peak-tflops")
    return GPU(device_name, bandwidth * 1e12, peak_tflops * 1e12)


def generation_bound(s: ModelShape, gpu: GPU, prompts: int, n: int, prompt_len: int, new_tokens: int,
                     weight_bytes: int = 2, kv_bytes: int = 2) -> dict:
    """The fastest ``prompts`` x ``n`` completions of ``new_tokens`` tokens can be made, the way
    :func:`mgrpo_cli.rollout.engine.sample` makes them: one prefill of the ``prompts`` distinct prompts of
    ``prompt_len`` tokens (its last position gives token 0), then ``new_tokens - 1`` decode steps of
    ``prompts * n`` rows, step j attending ``prompt_len + j`` positions. Each part is bounded by the
    larger of its bytes over the bandwidth and its FLOPs over the peak."""
    batch = prompts * n
    prefill_flops = forward_flops(s, prompts * prompt_len, prompts, prompts * causal_pairs(prompt_len))
    prefill_bytes = decode_step_bytes(s, prompts, 0, weight_bytes, kv_bytes) \
        + prompts * prompt_len * kv_elements_per_position(s) * kv_bytes  # weights read, cache written
    steps = range(1, new_tokens)
    step_bytes = [decode_step_bytes(s, batch, prompt_len + j, weight_bytes, kv_bytes) for j in steps]
    step_flops = [decode_step_flops(s, batch, prompt_len + j) for j in steps]
    memory_s = sum(b / gpu.bandwidth for b in step_bytes)
    compute_s = sum(f / gpu.peak_flops for f in step_flops)
    bound_s = (max(prefill_bytes / gpu.bandwidth, prefill_flops / gpu.peak_flops)
               + sum(max(b / gpu.bandwidth, f / gpu.peak_flops) for b, f in zip(step_bytes, step_flops, strict=True)))
    tokens = batch * new_tokens
    return {
        "tokens": tokens, "decode_steps": len(step_bytes),
        "decode_bytes": sum(step_bytes), "decode_flops": sum(step_flops),
        "prefill_bytes": prefill_bytes, "prefill_flops": prefill_flops,
        "decode_memory_bound_s": memory_s, "decode_compute_bound_s": compute_s,
        "bound_s": bound_s, "bound_tokens_per_s": tokens / bound_s,
    }


def logps_forward_flops(s: ModelShape, groups: int, n: int, prompt_len: int, completion_len: int,
                        shared_prompts: bool = True) -> int:
    """FLOPs of one forward of :func:`completion_logps` over ``groups`` x ``n`` rows. ``shared_prompts``:
    each prompt once (its last position through lm_head), then each row's completion after its prompt
    (all but the last token through the model, all through lm_head); otherwise (gradient checkpointing
    with gradients on) one sequence of prompt + completion per row, the last ``completion_len + 1``
    positions through lm_head."""
    rows = groups * n
    if not shared_prompts:
        length = prompt_len + completion_len
        return forward_flops(s, rows * length, rows * (completion_len + 1), rows * causal_pairs(length))
    prompt = forward_flops(s, groups * prompt_len, groups, groups * causal_pairs(prompt_len))
    c = completion_len - 1  # the last completion token is only a target
    return prompt + forward_flops(s, rows * c, rows * c, rows * (c * prompt_len + causal_pairs(c)))


def loss_pass_flops(s: ModelShape, groups: int, n: int, prompt_len: int, completion_len: int,
                    reference: bool = True, policy_shared_prompts: bool = True) -> dict:
    """Model FLOPs of one loss pass: the policy's forward + backward (3 x forward; recomputation by
    gradient checkpointing not counted), plus the reference's forward (always with shared prompts:
    it runs without gradients) when ``reference``. ``tokens``: the rollout's prompt and completion tokens."""
    policy = logps_forward_flops(s, groups, n, prompt_len, completion_len, policy_shared_prompts)
    ref = logps_forward_flops(s, groups, n, prompt_len, completion_len, True) if reference else 0
    return {"policy_forward_flops": policy, "reference_forward_flops": ref, "flops": 3 * policy + ref,
            "tokens": groups * prompt_len + groups * n * completion_len}


def fraction(measured_per_s: float, bound_per_s: float) -> float:
    """What share of the bound a measured rate reaches."""
    return measured_per_s / bound_per_s if bound_per_s else float("nan")
