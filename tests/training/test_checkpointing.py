"""The checkpoint writer (mgrpo_cli/training/checkpointing.py): whole files only, the rotation of
``trainer.keep_checkpoints``, named files beside it, a full disk as one error, the newest that loads."""
from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mgrpo_cli.errors import DiskFull, UserError
from mgrpo_cli.training.checkpointing import CheckpointWriter, DirectCheckpointIO, newest_loadable


class _Trainer:
    """What the writer uses of a Trainer: the step, rank 0, save_checkpoint through DirectCheckpointIO."""

    def __init__(self, fail: BaseException | None = None):
        self.global_step, self.is_global_zero, self.fail = 0, True, fail
        self.strategy = SimpleNamespace(barrier=lambda name: None)

    def save_checkpoint(self, path, weights_only=False):
        if self.fail is not None:
            Path(path).write_bytes(b"half a checkpoint")
            raise self.fail
        DirectCheckpointIO().save_checkpoint({"global_step": self.global_step}, path)


def _step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def test_save_last_keeps_the_newest_k_and_writes_a_step_once(tmp_path):
    writer, trainer = CheckpointWriter(tmp_path, keep=3), _Trainer()
    for step in (4, 8, 8, 12, 16):
        trainer.global_step = step
        writer.save_last(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-1.ckpt", "last-2.ckpt", "last.ckpt"]
    assert [_step(tmp_path / n) for n in ("last.ckpt", "last-1.ckpt", "last-2.ckpt")] == [16, 12, 8]
    one = CheckpointWriter(tmp_path / "one", keep=1)
    for step in (1, 2):
        trainer.global_step = step
        one.save_last(trainer)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["last.ckpt"] and _step(one.last) == 2


def test_named_files_sit_beside_the_rotation(tmp_path):
    writer, trainer = CheckpointWriter(tmp_path, keep=2), _Trainer()
    trainer.global_step = 5
    writer.save_last(trainer)
    best = writer.save(trainer, "best-step=5.ckpt")
    trainer.global_step = 6
    writer.save_last(trainer)
    assert _step(best) == 5 and _step(writer.last) == 6 and _step(tmp_path / "last-1.ckpt") == 5
    writer.remove("best-step=5.ckpt")
    assert not best.exists()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_a_full_disk_is_disk_full_and_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    import os

    writer = CheckpointWriter(tmp_path, keep=2)
    writer.save_last(_Trainer())
    # torch's RuntimeError counts as a full disk only when the folder has (almost) no space left
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=3, f_frsize=4096))
    trainer = _Trainer(fail=error)
    trainer.global_step = 1
    with pytest.raises(DiskFull) as raised:
        writer.save_last(trainer)
    assert str(raised.value) == f"no space left on device writing {tmp_path / 'last.ckpt'}"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and _step(writer.last) == 0


def test_another_write_error_is_itself(tmp_path):
    with pytest.raises(PermissionError):
        CheckpointWriter(tmp_path).save_last(_Trainer(fail=PermissionError(errno.EACCES, "denied")))
    assert list(tmp_path.iterdir()) == []


def test_newest_loadable_skips_a_damaged_newest_with_one_warning(tmp_path, caplog):
    writer, trainer = CheckpointWriter(tmp_path, keep=2), _Trainer()
    assert newest_loadable(tmp_path) is None  # no checkpoint yet
    for step in (4, 8):
        trainer.global_step = step
        writer.save_last(trainer)
    data = writer.last.read_bytes()
    writer.last.write_bytes(data[: len(data) // 2])  # truncated by a node failure
    with caplog.at_level("WARNING"):
        chosen = newest_loadable(tmp_path)
    assert chosen == tmp_path / "last-1.ckpt" and _step(chosen) == 4
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "last.ckpt does not load" in warning and "last-1.ckpt" in warning
    assert (tmp_path / "last.ckpt.damaged").is_file() and not writer.last.exists()
    trainer.global_step = 12  # the next save keeps the good one in the rotation
    CheckpointWriter(tmp_path, keep=2).save_last(trainer)
    assert _step(tmp_path / "last.ckpt") == 12 and _step(tmp_path / "last-1.ckpt") == 4


def test_no_checkpoint_that_loads_is_one_line(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(UserError, match=r"no checkpoint of .* loads \(.*last\.ckpt: "):
        newest_loadable(tmp_path)
