"""Step-based checkpoints: ``<run>/checkpoints/last.ckpt``, written whole or not at all.

Every ``every`` optimizer steps (and when fit ends) the Trainer's full checkpoint (weights, optimizer,
the module's own state) is written to a temporary file and renamed over ``last.ckpt``, so a run
killed mid-write still has its previous checkpoint. Lightning's ``ModelCheckpoint`` is not used: it
is built for automatic optimization and monitored metrics, and this project's step owns its
optimizer steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L

LAST = "last.ckpt"


class StepCheckpoint(L.Callback):
    def __init__(self, folder: str | Path, every: int):
        self.folder, self.every = Path(folder), every
        self._saved_at = 0  # the global step of the last save

    @property
    def path(self) -> Path:
        return self.folder / LAST

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # a step may take several optimizer steps (layer.combine=sequential): save on crossing a multiple
        if trainer.global_step // self.every > self._saved_at // self.every:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_at:
            self.save(trainer)

    def save(self, trainer) -> None:
        """Every rank takes part (a sharded strategy gathers); rank 0 renames the finished file."""
        tmp = self.folder / f".{LAST}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("mgrpo_checkpoint")
        self._saved_at = trainer.global_step
