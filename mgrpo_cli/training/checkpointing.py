"""A run's checkpoint files: one writer, every file written whole or not at all.

:class:`CheckpointWriter` writes every checkpoint of a run folder's ``checkpoints/``: the Trainer's
full checkpoint (weights, optimizer, the module's own state) goes to a temporary file
``.<name>.tmp`` in the same folder, which is renamed over ``<name>`` once complete, so a run killed
mid-write still has its previous file. ``save_last`` keeps the ``keep`` newest step checkpoints
(``trainer.keep_checkpoints``): ``last.ckpt`` is the newest, ``last-1.ckpt`` the one before, and so
on; ``save(trainer, name)`` writes any other named file (the best-k checkpoints of validation) and
``remove(name)`` drops one. A write that fills the disk raises :class:`~mgrpo_cli.errors.DiskFull`
(``no space left on device writing <path>``) after removing its temporary file.

:func:`newest_loadable` is what ``resume=`` continues from: the newest of ``last.ckpt``,
``last-1.ckpt``, ... that loads. A damaged newer one (truncated by a node failure, a bad disk) is
reported in one warning line and moved aside to ``<name>.damaged``, out of the rotation.

:class:`StepCheckpoint` saves every ``every`` optimizer steps and when fit ends. Lightning's
``ModelCheckpoint`` is not used: it is built for automatic optimization and monitored metrics, and
this project's step owns its optimizer steps. :class:`DirectCheckpointIO` makes Lightning's own
write stream straight into the temporary file (Lightning's default first serializes the whole
checkpoint in memory, then writes it through a second temporary file under the system's ``/tmp``).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mgrpo_cli.errors import DiskFull, disk_full

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def rotation(folder: str | Path, keep: int) -> list[Path]:
    """The step checkpoints kept, newest first: ``last.ckpt``, ``last-1.ckpt``, ..., ``last-<keep-1>.ckpt``."""
    folder = Path(folder)
    return [folder / LAST] + [folder / f"last-{i}.ckpt" for i in range(1, keep)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # DeepSpeed writes a folder per checkpoint
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class DirectCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight into the path Lightning is given (the writer's temporary file); a
    failed write leaves no partial file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        import torch

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise


class CheckpointWriter:
    """Every checkpoint file of the run folder ``folder`` (see the module docstring). Every rank calls
    ``save``/``save_last`` (a sharded strategy gathers); rank 0 renames the finished file."""

    def __init__(self, folder: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder, self.keep = Path(folder), keep
        self.saved_step: Optional[int] = None  # the global step last.ckpt holds, once this writer wrote it

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def save(self, trainer, name: str) -> Path:
        """Write the trainer's checkpoint to ``<folder>/<name>``, replacing any file of that name."""
        path = self.folder / name
        self._write(trainer, path, [path])
        return path

    def save_last(self, trainer) -> Path:
        """Write the trainer's checkpoint as ``last.ckpt``, the older ones shifted one place down the
        rotation (the oldest beyond ``keep`` dropped); nothing when it holds this step already."""
        if trainer.global_step != self.saved_step:
            self._write(trainer, self.last, rotation(self.folder, self.keep))
            self.saved_step = trainer.global_step
        return self.last

    def remove(self, name: str) -> None:
        _remove(self.folder / name)

    def _write(self, trainer, path: Path, shift: list[Path]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
        except BaseException as e:
            if trainer.is_global_zero:
                _remove(tmp)
            if disk_full(e, self.folder):
                raise DiskFull(path) from None
            raise
        if trainer.is_global_zero:
            for older, newer in zip(reversed(shift[1:]), reversed(shift[:-1]), strict=True):
                if newer.exists():
                    _remove(older)
                    os.replace(newer, older)
            _remove(path) if path.is_dir() else None
            os.replace(tmp, path)
        trainer.strategy.barrier("mgrpo_checkpoint")


def loads(path: Path) -> Optional[str]:
    """None when ``path`` holds a whole checkpoint (it opens and has its step), else why not."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True) if path.is_file() \
            else torch.load(path / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)  # a DeepSpeed folder
    except Exception as e:
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    if not isinstance(saved, dict) or "global_step" not in saved:
        return "not a training checkpoint (no global_step)"
    return None


def newest_loadable(folder: str | Path, *, set_aside: bool = True) -> Optional[Path]:
    """The newest step checkpoint of ``folder`` that loads; None when there is none. Each newer one that
    does not load is reported in one warning line and (``set_aside``) renamed ``<name>.damaged``; when
    none loads, :class:`~mgrpo_cli.errors.UserError` says why the newest does not."""
    from mgrpo_cli.errors import UserError

    def age(path: Path) -> int:
        n = path.stem.rpartition("-")[2]
        return 0 if path.name == LAST else int(n) if n.isdigit() else 1 << 30

    candidates = sorted(Path(folder).glob("last*.ckpt"), key=age)
    reasons = []
    for k, path in enumerate(candidates):
        why = loads(path)
        if why is None:
            return path
        reasons.append(f"{path}: {why}")
        if k + 1 == len(candidates):
            break
        damaged = path.with_name(path.name + ".damaged")
        if set_aside:
            _remove(damaged)
            os.replace(path, damaged)
        log.warning("checkpoint %s does not load (%s)%s; using %s", path, why,
                    f", moved to {damaged.name}" if set_aside else "", candidates[k + 1].name)
    if reasons:
        raise UserError(f"no checkpoint of {folder} loads ({reasons[0]})")
    return None


class StepCheckpoint(L.Callback):
    """``writer.save_last`` every ``every`` optimizer steps and when fit ends."""

    def __init__(self, writer: CheckpointWriter, every: int):
        self.writer, self.every = writer, every
        self._saved_at = 0  # the global step of the last step-based save

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # a step may take several optimizer steps (layer.combine=sequential): save on crossing a multiple
        if trainer.global_step // self.every > self._saved_at // self.every:
            self.writer.save_last(trainer)
            self._saved_at = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.writer.save_last(trainer)
