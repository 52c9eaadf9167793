"""Video decoder backends behind one interface (``VideoReader``), chosen by name or automatically.

    reader = open_video("video_3.mp4", backend="auto")
    frames = reader.get_frames([100, 102, 104])  # uint8 [T=3, H, W, 3], in the order asked

Automatic choice, first importable wins: PyNvVideoCodec (GPU, only with CUDA), torchcodec, PyAV, decord.
``MEGAWAN_DISABLE_DECODERS=torchcodec,decord`` makes the named backends count as not installed (CI uses it
to run the data tests as on a machine without FFmpeg's shared libraries, where torchcodec cannot load).
"""

from __future__ import annotations

import functools
import os

import torch

from megawan.data.decoders import decord_reader, nvcodec_reader, pyav_reader, torchcodec_reader
from megawan.data.decoders.base import VideoReader

__all__ = ["VideoReader", "AUTO_ORDER", "available_backends", "disabled_backends", "resolve_backend", "open_video"]

AUTO_ORDER = ("pynvvideocodec", "torchcodec", "pyav", "decord")

_MODULES = {
    "pynvvideocodec": nvcodec_reader,
    "torchcodec": torchcodec_reader,
    "pyav": pyav_reader,
    "decord": decord_reader,
}


DISABLE_ENV = "MEGAWAN_DISABLE_DECODERS"


def disabled_backends() -> set[str]:
    """Backends named in MEGAWAN_DISABLE_DECODERS (comma-separated); an unknown name is an error."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    unknown = names - set(_MODULES)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown decoder backends {sorted(unknown)}; "
                         f"known: {', '.join(AUTO_ORDER)}")
    return names


@functools.cache
def _importable(name: str) -> bool:
    return _MODULES[name].is_available()


def _is_available(name: str) -> bool:
    return name not in disabled_backends() and _importable(name)


def available_backends() -> list[str]:
    """Backends importable here, in automatic-choice order."""
    return [name for name in AUTO_ORDER if _is_available(name)]


def resolve_backend(name: str = "auto") -> str:
    """The backend ``open_video`` would use for ``name`` ("auto" or a backend name)."""
    if name == "auto":
        found = available_backends()
        if not found:
            raise RuntimeError(f"no video decoder is installed (tried {', '.join(AUTO_ORDER)})")
        return found[0]
    if name not in _MODULES:
        raise ValueError(f"unknown decoder backend {name!r}; choose from auto, {', '.join(AUTO_ORDER)}")
    if name in disabled_backends():
        raise RuntimeError(f"decoder backend {name!r} is disabled by {DISABLE_ENV}")
    if not _is_available(name):
        raise RuntimeError(f"decoder backend {name!r} is not importable here")
    return name


def open_video(path, backend: str = "auto", *, num_threads: int = 1,
               device: str | torch.device | None = None) -> VideoReader:
    """Open ``path`` with ``backend``; ``num_threads`` is per reader (loader workers add parallelism)."""
    name = resolve_backend(backend)
    if name == "pynvvideocodec":
        return nvcodec_reader.NvCodecReader(path, device=device)
    if name == "torchcodec":
        return torchcodec_reader.TorchCodecReader(path, num_threads=num_threads, device=device)
    if name == "decord":
        return decord_reader.DecordReader(path, num_threads=num_threads)
    return pyav_reader.PyAVReader(path, num_threads=num_threads)
