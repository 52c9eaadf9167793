"""The library versions megawan's patches are written for, and the check every patch makes first.

Three layers reach into private APIs: ``megawan.parallel_state.cpu_compat`` (megatron-core's CUDA
helpers and its optimizer's reshardable load), ``megawan.layers.compile_compat`` (megatron-core's
linear-layer helpers) and ``megawan.layers.fp8`` (torchao's float8 scale / cast / scaled-GEMM
functions). setup.py pins these versions; ``require`` makes a patch whose target moved or changed its
parameters fail at once, naming the version it was written for, instead of silently patching nothing.
"""

from __future__ import annotations

import importlib.metadata
import inspect

WRITTEN_FOR = {"megatron-core": "0.16.1", "torchao": "0.18.0"}


class PatchError(RuntimeError):
    """A megawan patch no longer applies to the installed library."""


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _package_of(owner) -> str:
    module = getattr(owner, "__module__", None) or getattr(owner, "__name__", "")
    return "torchao" if module.startswith("torchao") else "megatron-core"


def require(owner, name: str, params: tuple[str, ...] = ()):
    """``owner.name``, which a megawan patch replaces or calls; ``params``: parameter names the patch
    passes or relies on. Raises ``PatchError`` when it is missing or lacks one of them."""
    package = _package_of(owner)
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    if not hasattr(owner, name):
        raise PatchError(f"{where} is missing in {package} {installed_version(package)}: megawan's patch "
                         f"is written for {package} {WRITTEN_FOR[package]} (pinned in setup.py)")
    value = getattr(owner, name)
    if params:
        found = tuple(inspect.signature(value).parameters)
        missing = [p for p in params if p not in found]
        if missing:
            raise PatchError(f"{where}{found} in {package} {installed_version(package)} has no parameter "
                             f"{', '.join(missing)}: megawan's patch is written for {package} "
                             f"{WRITTEN_FOR[package]} (pinned in setup.py)")
    return value
