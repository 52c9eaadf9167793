"""Make megatron-core's CUDA-only helpers work on CPU ranks (gloo).

megatron-core assumes a GPU in places that megawan reaches:

* ``torch.cuda.current_device()`` -- the sequence-parallel all-gather / reduce-scatter, the global
  memory buffer and DDP's buffers allocate their outputs there;
* the CUDA RNG tracker (``model_parallel_cuda_manual_seed`` / ``get_cuda_rng_tracker().fork()``);
* ``torch.cuda.current_stream()`` / ``default_stream()`` / ``synchronize()`` -- megatron's DDP orders
  gradient reductions on streams; dist_checkpointing synchronises before writing;
* megatron's optimizer (``CudaAsCpu`` / ``on_cpu``): scalars created on 'cuda', ``.cuda()`` calls and
  CUDA type-name checks, wrapped around the optimizer's calls only; and its reshardable checkpoint load
  into torch's Adam, the fallback where neither Apex nor TE is installed (``torch_adam_reshardable_load``).

``apply()`` installs CPU stand-ins for these, scoped to megatron-core: each ``megatron.core`` module
gets a view of ``torch`` whose ``torch.cuda`` answers with the stand-ins; ``torch.cuda`` itself is left
alone, so the rest of the process (the NVDEC video reader, the user's code) sees the real GPU.
``megawan.parallel_state.initialize`` calls it whenever the ranks run on CPU, including gloo ranks on a
machine that has GPUs (``MEGAWAN_BACKEND=gloo``, the test harness's default): there megatron would
otherwise allocate its gathers on ``cuda:0``. It is idempotent; a process whose ranks use CUDA never
calls it. Each patched megatron attribute is checked to exist first (``megawan.compat.require``): a
megatron-core that no longer has it fails at once, naming the version the patch was written for.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

from megawan import compat

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


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _fold_in_compiled_code(fn) -> None:
    """Let torch.compile fold ``fn()`` to a constant, as it folds the real ``torch.cuda.current_device``:
    otherwise a call returning a non-tensor could break the graph at each of megatron's gathers inside a
    compiled block. Private dynamo table; where it is missing dynamo inlines the stand-in instead."""
    try:
        from torch._dynamo.variables import torch as dynamo_torch

        dynamo_torch.constant_fold_functions[fn] = None
    except (ImportError, AttributeError, TypeError):
        pass


_STREAM = _CpuStream()
# What megatron-core's modules see as torch.cuda.<name> on CPU ranks.
_CUDA_STAND_INS = {
    "current_device": _cpu_current_device,
    "current_stream": lambda device=None: _STREAM,
    "default_stream": lambda device=None: _STREAM,
    "synchronize": lambda device=None: None,  # dist_checkpointing syncs before writing
}


def _view(real: types.ModuleType, name: str, overrides: dict) -> types.ModuleType:
    """A module whose attributes are ``overrides``, then whatever ``real`` has now (looked up at each
    access, so later changes to ``real`` show through)."""
    view = types.ModuleType(name)
    view.__dict__.update(overrides)
    view.__getattr__ = lambda attr: getattr(real, attr)  # PEP 562: the fallback for missing attributes
    return view


_CUDA_VIEW = _view(torch.cuda, "torch.cuda", _CUDA_STAND_INS)
_TORCH_VIEW = _view(torch, "torch", {"cuda": _CUDA_VIEW})

# megatron-core modules on megawan's CPU paths, imported before the sweep so that they get the view;
# every megatron.core module loaded by then gets it too.
_MEGATRON_MODULES = (
    "megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random", "megatron.core.utils", "megatron.core.parallel_state",
    "megatron.core.distributed.distributed_data_parallel", "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.torch", "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


def _give_megatron_the_view() -> list[str]:
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _TORCH_VIEW
            patched.append(name)
    return patched


def apply() -> None:
    """Install the CPU stand-ins for megatron-core; call only in a process whose ranks compute on CPU."""
    global _APPLIED
    if _APPLIED:
        return
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED", "initialize_rng_tracker"):
        compat.require(mcore_random, name)
    _fold_in_compiled_code(_cpu_current_device)
    _give_megatron_the_view()
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *a, **k: None
    _APPLIED = True


class CudaAsCpu(TorchFunctionMode):
    """Runs megatron-core's optimizer code on CPU tensors.

    megatron's (distributed) optimizer hard-codes CUDA in a few places: ``torch.tensor(..., device='cuda')``
    for its loss-scale / found-inf / norm scalars, ``.cuda()`` on state tensors, and type checks such as
    ``param.type() == 'torch.cuda.BFloat16Tensor'``. Inside this mode a ``cuda`` device argument becomes
    ``cpu``, ``.cuda()`` is the identity and ``Tensor.type()`` answers with the CUDA type name. Only the
    optimizer's own calls run under it (``on_cpu`` below), never the model.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and not isinstance(device, int) and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _OnCpu:
    """Proxy of an object whose every method call runs under ``CudaAsCpu``."""

    def __init__(self, target):
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with CudaAsCpu():
                return value(*args, **kwargs)

        return call

    def __setattr__(self, name, value):
        setattr(self._target, name, value)


def torch_adam_reshardable_load() -> None:
    """Let megatron's distributed optimizer load a ``fully_reshardable`` checkpoint into torch's Adam.

    Without Apex or Transformer Engine (every CPU rank) megatron-core 0.16.1 falls back to torch's Adam,
    whose per-parameter state carries a ``step`` tensor. Its reshardable load copies every state key from
    the checkpoint, which (rightly) stores ``step`` once per param group, not per tensor, and so fails with
    ``KeyError: 'step'``. The step itself is restored from the param groups before this copy; this wrapper
    leaves it out of the per-tensor copy and gives each parameter its own step tensor (megatron sets one
    shared tensor, which torch's Adam would then advance once per parameter). Idempotent; nothing changes
    where the fused Adam is used.
    """
    from megatron.core.optimizer import distrib_optimizer as mdo

    cls = mdo.DistributedOptimizer
    if compat.require(mdo, "HAVE_APEX_OR_TE") or getattr(cls, "_megawan_step_patch", False):
        return
    original = compat.require(cls, "_set_main_param_and_optimizer_states", ("self", "model_param", "tensors"))

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                # megatron hands every parameter the same step tensor; torch's Adam increments each
                # parameter's step in place, so a shared one would advance once per parameter per step
                state["step"] = step.clone()

    cls._set_main_param_and_optimizer_states = set_states
    cls._megawan_step_patch = True


def on_cpu(obj, device: torch.device):
    """``obj`` itself on a GPU; on CPU ranks, a proxy running its methods under ``CudaAsCpu``."""
    return obj if device.type == "cuda" else _OnCpu(obj)
