"""Make megatron-core's CUDA-only helpers work on CPU ranks (gloo).

megatron-core assumes a GPU in three places that megawan reaches:

* ``torch.cuda.current_device()`` -- the sequence-parallel all-gather / reduce-scatter and the
  global memory buffer allocate their outputs there;
* the CUDA RNG tracker (``model_parallel_cuda_manual_seed`` / ``get_cuda_rng_tracker().fork()``);
* ``torch.cuda.current_stream()`` -- used by megatron's DDP to order gradient reductions.

``apply()`` installs CPU stand-ins for these. ``megawan.parallel_state.initialize`` calls it whenever
the ranks run on CPU, including gloo ranks on a machine that has GPUs (``MEGAWAN_BACKEND=gloo``, the
test harness's default): there megatron would otherwise allocate its gathers on ``cuda:0``. It is
idempotent; a process whose ranks use CUDA never calls it.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _CpuStream:
    """Stand-in for a CUDA stream: CPU ops are already ordered, so every method is a no-op."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


class CpuRNGStatesTracker:
    """CPU version of megatron's CudaRNGStatesTracker: named RNG states forked around a block."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def apply() -> None:
    """Install the CPU stand-ins; call only in a process whose ranks compute on CPU."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    stream = _CpuStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.default_stream = lambda device=None: stream
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *a, **k: None
    _APPLIED = True
