"""Loading policies and tokenizers: a hub name or local folder, or the embedded tiny model.

The tiny model is a Qwen2-architecture causal LM built from a config, with a byte-level tokenizer
the project makes itself: one token per byte (256 byte symbols, no merges) plus pad/bos/eos/unk.
It is laid out as a byte-level BPE with no merges, so transformers' ``AutoTokenizer`` (which always
rebuilds ``Qwen2Tokenizer`` for ``model_type="qwen2"``, see ``../shared/STACK.md``) loads it back
unchanged, spaces and newlines included. Also here: LoRA wrapping, the reference policy for the KL
term, and export with ``save_pretrained``.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# user/assistant turns for the tiny model when a layer-2 prompt asks for a new turn
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (space -> 'Ġ', newline -> 'Ċ')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer():
    """A 260-token byte-level tokenizer that survives ``AutoTokenizer`` round trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        unk_token="<|unk|>", padding_side="left", model_max_length=4096,
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    return hf


def build_tiny_model(cfg: Any, tokenizer, seed: int = 0):
    """Random-initialised Qwen2 causal LM with the tiny config's sizes."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return model


def resolve_dtype(name: str, accelerator: str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if accelerator in ("gpu", "cuda") and torch.cuda.is_available() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype: expected auto|float32|bfloat16|float16, got {name!r}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(cfg: Any, accelerator: str = "cpu", seed: int = 0, path: Optional[str] = None):
    """(model, tokenizer) from ``path`` (or ``cfg.path``): a hub name or folder; tiny if both unset.

    ``cfg.random_init_layers`` builds a random-initialised model with the same architecture and
    that many layers (offline tests of the real model configs; weights are not downloaded).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or cfg.path
    if path is None:
        if cfg.name != "tiny":
            raise ValueError(f"model.path is not set for model={cfg.name} (a hub name or a local folder)")
        tok = build_byte_tokenizer()
        return build_tiny_model(cfg, tok, seed=seed), tok
    dtype = resolve_dtype(cfg.dtype, accelerator)
    if cfg.random_init_layers:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        config.num_hidden_layers = cfg.random_init_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: cfg.random_init_layers]
        config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    else:
        is_local = Path(path).exists()
        if not is_local and "/" not in path:
            raise ValueError(f"model.path: {path!r} is neither a local folder nor a hub name (org/name)")
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    tok = load_tokenizer(path, cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


def apply_lora(model, cfg: Any):
    """Wrap ``model`` with a peft LoRA adapter (only adapter weights train)."""
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        raise ValueError(f"lora.target_modules: none of {list(cfg.target_modules)} are modules of this model")
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen_reference(model):
    """A frozen copy of ``model`` for the KL term (full fine-tuning with beta > 0)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def export(model, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """``save_pretrained`` the policy (LoRA merged, or the adapter alone) with its tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if is_peft(model) and merge_lora:
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
