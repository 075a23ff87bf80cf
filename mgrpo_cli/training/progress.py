"""The training bar in steps: ``step 120/300``, not Lightning's epoch counter.

A run is step-based (``trainer.max_steps``, an endless data stream), so Lightning's rich bar would
read ``Epoch 0/-2`` with an unknown total; :class:`StepProgressBar` shows the optimizer steps done
out of ``max_steps``, and on a resumed run starts where the run stopped.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def step_description(step: int, max_steps: int) -> str:
    """``step 120/300``; ``step 120`` when the run has no step limit (``max_steps`` < 1)."""
    return f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar whose training task counts ``trainer.global_step`` out of ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        steps = self.trainer.max_steps
        return steps if steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return step_description(self.trainer.global_step, self.trainer.max_steps)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_step(trainer)

    def _show_step(self, trainer: L.Trainer) -> None:
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                             description=step_description(trainer.global_step, trainer.max_steps))
        self.refresh()
