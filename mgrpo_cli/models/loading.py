"""Loading policies and tokenizers: a hub name or local folder, or the embedded tiny model (``models.tiny``).

Also here: LoRA wrapping, the reference policy for the KL term, export with ``save_pretrained``, the
fp32 lm_head and dropout switches, and weight checksums (multi-process runs compare them).

Real models (``conf/model/qwen*.yaml``) load from a hub name or a local folder, in the configured
dtype (``auto``: bf16 on GPU, fp32 on CPU). A folder holding a LoRA adapter (``adapter_config.json``,
as ``lora.export=adapter`` writes it) loads its base model and the adapter on top.
``model.random_init_layers`` builds a random-initialised model with the folder's architecture and
that many layers, without reading weights (offline tests of the real configs).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mgrpo_cli.errors import UserError
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a policy is loaded or built from (``cli.build.model_spec`` makes it from ``model.*``)."""

    name: str
    path: Optional[str]  # hub name or local folder; None = the embedded tiny model
    dtype: str  # auto | float32 | bfloat16 | float16
    attn_implementation: str
    gradient_checkpointing: bool
    trust_remote_code: bool
    random_init_layers: Optional[int]  # a random-initialised model with path's architecture, this many layers
    # the embedded tiny model's architecture
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's settings (``cli.build.lora_spec`` makes it from ``lora.*``)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    export: str  # merged | adapter


def device_for(accelerator: str) -> torch.device:
    """cuda when ``trainer.accelerator`` asks for a GPU (gpu, cuda, or auto with one present), else cpu."""
    gpu = str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def resolve_dtype(name: str, accelerator: str = "cpu") -> torch.dtype:
    """``model.dtype``: auto = bf16 on a GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device_for(accelerator).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(name)]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(cfg: ModelSpec, accelerator: str = "cpu", seed: int = 0, path: Optional[str] = None):
    """(model, tokenizer) from ``path`` (or ``cfg.path``): a hub name or folder; tiny if both unset.

    ``cfg.random_init_layers`` builds a random-initialised model (seeded with ``seed``) with the same
    architecture and that many layers (offline tests of the real model configs; no weights are read).
    A folder with ``adapter_config.json`` is a LoRA adapter: its base model is loaded, then the adapter.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or cfg.path
    if path is None:
        if cfg.name != "tiny":
            raise UserError(f"model.path is not set for model={cfg.name} (a hub name or a local folder)")
        tok = build_byte_tokenizer()
        return build_tiny_model(cfg, tok, seed=seed), tok
    is_local = Path(path).exists()
    if is_local:
        path = str(Path(path).resolve())  # recorded as the base of a LoRA adapter export
    elif "/" not in path:
        raise ValueError(f"model.path: {path!r} is neither a local folder nor a hub name (org/name)")
    dtype = resolve_dtype(cfg.dtype, accelerator)
    if is_local and (Path(path) / "adapter_config.json").is_file():
        model = _load_adapter(cfg, path, dtype)
    elif cfg.random_init_layers:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        config.num_hidden_layers = cfg.random_init_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: cfg.random_init_layers]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                     trust_remote_code=cfg.trust_remote_code)
        model._mgrpo_random_init = True  # no weights behind config._name_or_path: no adapter-only export
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    tok = load_tokenizer(path, cfg.trust_remote_code)
    _align_special_tokens(model, tok)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing also back-propagates through frozen inputs (LoRA needs that)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def _load_adapter(cfg: ModelSpec, path: str, dtype: torch.dtype):
    """A LoRA adapter folder: its base model (hub name or folder) with the adapter on top, trainable."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model.path={path}: adapter_config.json names no base_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    return PeftModel.from_pretrained(model, path, is_trainable=True)


def _align_special_tokens(model, tok) -> None:
    """Generation stops and pads with the tokenizer's ids (a hub config may name other ones)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tok.eos_token_id


def apply_lora(model, cfg: LoraSpec):
    """Wrap ``model`` with a peft LoRA adapter (only adapter weights train).

    A model that already carries an adapter (loaded from an adapter export) keeps it, trainable.
    """
    from peft import LoraConfig, get_peft_model

    if is_peft(model):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model
    if cfg.export == "adapter" and not _reloadable_base(model):
        raise UserError("lora.export=adapter needs a base model with weights on disk or on the hub; this one is "
                         "random-initialised or built in-process, so an adapter alone could not be reloaded "
                         "(use lora.export=merged)")
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        raise UserError(f"lora.target_modules: none of {list(cfg.target_modules)} are modules of this model")
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def _reloadable_base(model) -> bool:
    return bool(getattr(model.config, "_name_or_path", "")) and not getattr(model, "_mgrpo_random_init", False)


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model) -> int:
    """ScaleRL's deterministic log-probs: every dropout of ``model`` (``nn.Dropout`` modules, LoRA's
    included, and attention dropout rates held as ``attention_dropout``) set to 0. How many it changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p != 0:
            m.p, changed = 0.0, changed + 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout != 0:
            m.attention_dropout, changed = 0.0, changed + 1
    return changed


class Fp32Head(torch.nn.Linear):
    """An lm_head whose weight is float32 and whose matmul runs in float32 (autocast off for it, the
    hidden states upcast): ScaleRL's fp32 head."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


class _CastLike:
    """A forward hook casting a module's output to the dtype ``like`` has at call time."""

    def __init__(self, like: torch.Tensor):
        self.like = like

    def __call__(self, module, args, out):
        return out.to(self.like.dtype)


def cast_lm_head_to_fp32(model) -> None:
    """ScaleRL's fp32 head: the lm_head becomes an :class:`Fp32Head` on the same weight, cast to float32.
    A head tied to the input embedding shares that weight, so the embedding's output is cast back to
    the dtype of the model's other parameters. Idempotent (re-applied after a precision plugin casts
    the whole model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is Fp32Head:
        head.float()
        return
    if type(head) is not torch.nn.Linear:
        raise UserError(f"grpo.cast_lm_head_to_fp32=true: the lm_head is a {type(head).__name__}, not a plain "
                        "Linear (a LoRA adapter on it?); leave lm_head out of lora.target_modules")
    new = Fp32Head(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight, new.bias = head.weight, head.bias
    other = next((p for p in base.parameters() if p is not head.weight), None)
    base.set_output_embeddings(new)
    new.float()
    embed = base.get_input_embeddings()
    if embed is not None and embed.weight is new.weight and other is not None:
        embed.register_forward_hook(_CastLike(other))


def frozen_reference(model):
    """A frozen copy of ``model`` for the KL term (full fine-tuning with beta > 0)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_policy(policy, beta: float):
    """The KL term's reference policy: none when ``beta`` is 0; none for a LoRA policy either (the
    reference is the same model with its adapter disabled, no second copy); else a frozen copy."""
    if beta <= 0 or is_peft(policy):
        return None
    return frozen_reference(policy)


def export(model, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """``save_pretrained`` the policy with its tokenizer: LoRA merged into the weights (default), or
    the adapter alone (``merge_lora=False``; ``adapter_config.json`` names the base to load it on).

    Either folder loads with ``mgrpo eval model.path=<folder>`` and with
    ``AutoModelForCausalLM.from_pretrained(<folder>)`` (transformers loads an adapter's base itself).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if is_peft(model) and merge_lora:
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("exported %s to %s", "the LoRA adapter" if is_peft(to_save) else "the model", out)
    return out


ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def rotary_frequencies(model) -> dict[str, torch.Tensor]:
    """float32 copies of the model's rotary inverse frequencies, by module path (see :func:`restore_rotary`)."""
    return {f"{name}.{b}": buf.detach().float().clone() for name, module in model.named_modules()
            for b, buf in module.named_buffers(recurse=False) if b in ROTARY_BUFFERS}


def restore_rotary(model, saved: dict[str, torch.Tensor]) -> None:
    """Put the float32 rotary frequencies back after a whole-module dtype cast.

    Lightning's ``bf16-true``/``16-true`` precisions (``trainer=gpu``'s default) call ``module.to(bf16)``,
    which also casts these non-persistent buffers. transformers keeps them in float32 when it loads a
    model in bf16, because bf16 keeps 8 bits of mantissa: an inverse frequency of 0.87 moves by up to
    0.002, so the rotation angle at position 1000 moves by up to ~2 radians.
    """
    for key, value in saved.items():
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path)
        setattr(module, name, value.to(getattr(module, name).device))


def param_checksums(model, trainable_only: bool = False) -> dict[str, str]:
    """sha256 of every parameter's bytes (name -> hex) plus ``"__all__"`` over all of them, in name order.

    Equal checksums on every rank of a data-parallel run mean the replicas hold identical weights.
    Sharded parameters (DTensor) are gathered first: a collective, so every rank must call this.
    """
    import hashlib

    total = hashlib.sha256()
    out: dict[str, str] = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()
        total.update(name.encode())
        total.update(data)
    out["__all__"] = total.hexdigest()
    return out
