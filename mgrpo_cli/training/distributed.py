"""What training on several processes needs beyond one process (the collectives do nothing in one process).

Every rank draws its own prompts and keeps each prompt's whole group (G completions, then H
corrections) to itself, so group advantages need no communication. Ranks talk in these places only:
- gradients (``trainer=ddp``): averaged once per optimizer step (:func:`all_reduce_grads`), not per
  backward pass, because ranks run different numbers of micro-batches (completions differ in length);
- metrics: each step's training metrics are averaged over ranks (:func:`mean_over_ranks`) and the
  validation rows of all ranks are gathered (:func:`gather`), so rank 0 logs whole-run numbers;
- sharded parameters (``trainer=fsdp``, FSDP2 ``fully_shard``): :func:`shard_policy` shards every
  decoder layer and the policy; :func:`full_params` gathers the full parameters once for a rollout,
  after which each rank samples alone (no collective per decoded token, ranks may stop at different
  lengths); :func:`max_over_ranks` lets every rank run the same number of loss passes, each one
  forward call and one backward (under sharding each is a collective), padding with zero-weight passes;
- :func:`weight_checksums_callback` writes each rank's weight checksums (``trainer.weight_checksums=true``),
  to check that data-parallel replicas stay identical.
Not here: DeepSpeed ZeRO-3 rollouts (its per-module parameter fetches would run per decoded token).
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgrpo_cli.models.loading import param_checksums

log = logging.getLogger(__name__)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(items: list) -> list:
    """The concatenation of every rank's ``items`` (in rank order), on every rank."""
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that logged it (ranks may log different keys, e.g. layer 2)."""
    if world_size() == 1:
        return metrics
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, {k: float(v) for k, v in metrics.items()})
    keys = sorted({k for part in parts for k in part})
    return {k: sum(p[k] for p in parts if k in p) / sum(1 for p in parts if k in p) for k in keys}


def max_over_ranks(n: int) -> int:
    """The largest ``n`` of any rank (how many passes every rank runs to stay in step)."""
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_grads(params: Iterable[torch.nn.Parameter], bucket_bytes: int = 128 << 20) -> None:
    """Average the gradients of ``params`` over ranks, in flat buckets; a missing gradient counts as zero."""
    n = world_size()
    if n == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for g in grads:  # same order on every rank: params come from the same module
        groups = buckets.setdefault((g.dtype, g.device), [[]])
        if groups[-1] and sum(x.numel() * x.element_size() for x in groups[-1]) + g.numel() * g.element_size() > bucket_bytes:
            groups.append([])
        groups[-1].append(g)
    for _, groups in sorted(buckets.items(), key=lambda kv: str(kv[0])):
        for group in groups:
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= n
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


@contextlib.contextmanager
def no_backward_sync(wrapper) -> Iterator[None]:
    """Suspend DDP's all-reduce in backward (gradients accumulate locally until :func:`all_reduce_grads`)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapper, DistributedDataParallel):
        with wrapper.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------- FSDP2 (trainer=fsdp)

def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(_fsdp_modules(model))


def shard_policy(policy, mesh, param_dtype: torch.dtype | None = None) -> None:
    """``fully_shard`` every decoder layer, then the policy (embeddings, final norm, head), in place.

    The root keeps its parameters gathered between forward and backward (they are used first and last).
    ``param_dtype`` (bf16 under ``bf16-mixed``): gathered parameters and compute in that dtype, while the
    shards, gradients reduced in float32 and the optimizer state keep the parameters' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()

    layers = [m for m in policy.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"trainer=fsdp: found no decoder layers (…DecoderLayer modules) in {type(policy).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    fully_shard(policy, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    log.info("sharded the policy over %d ranks (%d decoder layers)", mesh.size(), len(layers))


@contextlib.contextmanager
def full_params(policy) -> Iterator[None]:
    """Gather a sharded policy's full parameters for the duration of a rollout (collective on entry).

    Inside, forward passes communicate nothing, so ranks may decode different numbers of tokens.
    Nesting is allowed (the inner context does nothing). A policy that is not sharded passes through.
    """
    modules = _fsdp_modules(policy)
    if not modules or getattr(policy, "_mgrpo_full_params", False):
        yield
        return
    policy._mgrpo_full_params = True
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not policy, recurse=False)  # as shard_policy set it
        policy._mgrpo_full_params = False


class FullParamsEngine:
    """A rollout engine whose every ``generate`` runs inside :func:`full_params` of the policy."""

    def __init__(self, engine, policy):
        self.engine, self.policy = engine, policy

    def generate(self, prompts, **kw):
        with full_params(self.policy):
            return self.engine.generate(prompts, **kw)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, on CPU; empty on other ranks. Collective when sharded."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------- replica checks

def weight_checksums_callback(out: str | Path):
    """A Lightning callback writing ``<out>/checksums/rank<k>.json``: sha256 of the policy's weights at fit
    start and fit end on each rank (``trainer.weight_checksums=true``). Lightning is imported here only,
    so that this module stays light for the processes tests start."""
    import lightning as L

    class WeightChecksums(L.Callback):
        def __init__(self, folder: Path):
            self.folder, self.start = folder, {}

        def on_fit_start(self, trainer, pl_module) -> None:
            self.start = param_checksums(pl_module.policy)

        def on_fit_end(self, trainer, pl_module) -> None:
            end = param_checksums(pl_module.policy)
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                      "global_step": trainer.global_step, "start": self.start["__all__"], "end": end["__all__"],
                      "params": end, "params_start": self.start}
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))

    return WeightChecksums(Path(out) / "checksums")
