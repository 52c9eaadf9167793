"""A full disk during a checkpoint write: one message naming the checkpoint, the cause and the last good
checkpoint; the partial write is removed and the good checkpoint kept. The writer is made to fail in-process
(no real full disk): with ENOSPC itself, with the text a writer process's error carries, and with torch's
short-write error while the disk has no room left."""

from __future__ import annotations

import errno
import types

import pytest

from megawan.training import checkpointing


@pytest.fixture
def ckpt_root(tmp_path, monkeypatch):
    """A checkpoints folder holding one complete checkpoint (step 2); one rank, no process group needed."""
    root = tmp_path / "checkpoints"
    good = checkpointing.step_dir(root, 2)
    good.mkdir(parents=True)
    (good / checkpointing.MARKER).write_text("{}")
    (good / "__0_0.distcp").write_bytes(b"x" * 4096)
    monkeypatch.setattr(checkpointing, "dist", types.SimpleNamespace(get_rank=lambda: 0, barrier=lambda: None,
                                                                     get_world_size=lambda: 1))
    monkeypatch.setattr(checkpointing, "build_sharded_state_dict", lambda *a, **k: {})
    return root


def _writer_failing_with(error):
    def save(sd, path):
        (checkpointing.Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise error
    return save


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("CheckpointException ranks:dict_keys([0])\nTraceback (most recent call last):\n ...\n"
                 "OSError: [Errno 28] No space left on device"),  # a writer process's failure, as text
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 704 vs 598"),
], ids=["enospc", "writer-process-text", "torch-short-write"])
def test_a_full_disk_names_the_checkpoint_and_the_last_good_one(ckpt_root, monkeypatch, error):
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", _writer_failing_with(error))
    monkeypatch.setattr(checkpointing, "_free_bytes", lambda path: 1024)  # less than the good checkpoint's 4 KiB
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        checkpointing.save_checkpoint(ckpt_root, 3, None, None, None, common={}, keep=2)
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing {ckpt_root / 'step_00000003'}; the last good "
                              f"checkpoint is {ckpt_root / 'step_00000002'} (the partial write was removed; ")
    assert "\n" not in message and info.value.errno == errno.ENOSPC
    assert checkpointing.complete_checkpoints(ckpt_root) == [ckpt_root / "step_00000002"]
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_00000002"]  # the partial write is gone


def test_other_write_failures_keep_their_own_error(ckpt_root, monkeypatch):
    short = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", _writer_failing_with(short))
    monkeypatch.setattr(checkpointing, "_free_bytes", lambda path: 10 * 2**30)  # room left: not a full disk
    with pytest.raises(RuntimeError, match="unexpected pos") as info:
        checkpointing.save_checkpoint(ckpt_root, 3, None, None, None, common={}, keep=2)
    assert not isinstance(info.value, checkpointing.CheckpointWriteError)
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", _writer_failing_with(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError, match="I/O") as info:
        checkpointing.save_checkpoint(ckpt_root, 3, None, None, None, common={}, keep=2)
    assert not isinstance(info.value, checkpointing.CheckpointWriteError)
