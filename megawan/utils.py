"""Small helpers shared by the models, checkpoints and data code.

``atomic_path``: a reader, or a job restarted after a crash, sees the old file (or folder) or the new
one, never half of one. ``group_size``: the size of a process group where ``None`` means one rank.
``save_safetensors``: safetensors' ``save_file`` with the file mode every other file gets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in ``group``; ``None`` (no group: a parallel size of 1) counts as one."""
    return 1 if group is None else dist.get_world_size(group)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (a file, or a folder the block creates).

    When the block succeeds it is renamed onto ``path`` in one step (a folder may replace only an
    empty one); when it raises, it is removed. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)  # left by a crashed process that had this pid
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode the umask gives a new file (0644 under umask 022):
    save_file writes 0600, which other users of a shared checkpoint (or a copy taken elsewhere) cannot read."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
