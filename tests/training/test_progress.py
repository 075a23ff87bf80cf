"""The training bar counts steps (``step 2/3``), not epochs, and a resumed run starts at its step."""
import lightning as L
import torch

from mgrpo_cli.training.progress import StepProgressBar, step_description


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(100, 2), batch_size=1)  # 100 batches: one epoch > 3 steps


class _Seen(StepProgressBar):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = self.progress.tasks[self.train_progress_bar_id]
        self.seen.append((task.description, task.completed, task.total))


def _fit(tmp_path, max_steps, ckpt_path=None):
    bar = _Seen()
    trainer = L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu", limit_val_batches=0)
    trainer.fit(_Tiny(), ckpt_path=ckpt_path)
    return trainer, bar


def test_the_bar_counts_steps_out_of_max_steps(tmp_path):
    trainer, bar = _fit(tmp_path, 3)
    assert bar.seen == [("step 1/3", 1, 3), ("step 2/3", 2, 3), ("step 3/3", 3, 3)]
    ckpt = tmp_path / "at3.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed = _fit(tmp_path, 5, ckpt_path=str(ckpt))
    assert resumed.seen == [("step 4/5", 4, 5), ("step 5/5", 5, 5)]


def test_description_without_a_step_limit():
    assert step_description(120, 300) == "step 120/300" and step_description(7, -1) == "step 7"
