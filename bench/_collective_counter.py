"""Count the bytes of every torch.distributed collective a rank issues (used by bench_dit_comm.py).

The counter wraps the collective functions of ``torch.distributed`` and every alias of them that an
imported megatron / megawan module holds (megatron binds ``dist_all_gather_func`` and
``dist_reduce_scatter_func`` at import time, so patching ``torch.distributed`` alone would miss them).
Nested calls (``_reduce_scatter_base`` calling ``reduce_scatter_tensor``, ...) count once.

Two byte figures per call, both per rank, n = the group's size:

* ``wire``: bytes this rank sends with a bandwidth-optimal algorithm (ring / pairwise exchange):
  all-gather (n-1) x its input; reduce-scatter (n-1) x its output; all-reduce 2 (n-1)/n x the tensor;
  all-to-all the input minus the chunk it keeps, (n-1)/n x the input for even splits; a batch of
  point-to-point ops (ring attention) the tensors it sends. The analytic figures in the bench use the
  same definition.
* ``buffer``: the size of the full tensor the collective works on: the gathered output of an
  all-gather, the input of a reduce-scatter / all-to-all, the tensor of an all-reduce; for a batch of
  point-to-point ops, the tensors sent and received.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

WRAPPED = (
    "all_gather_into_tensor", "_all_gather_base", "all_gather_single", "all_gather", "reduce_scatter_tensor",
    "_reduce_scatter_base", "reduce_scatter_single",
    "reduce_scatter", "all_reduce", "all_to_all_single", "all_to_all", "broadcast", "reduce", "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
)
# Collective names as reported (aliases folded into one type).
CANONICAL = {"_all_gather_base": "all_gather_into_tensor", "all_gather_single": "all_gather_into_tensor",
             "_reduce_scatter_base": "reduce_scatter_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class CollectiveCounter:
    """Context manager: while active, every collective adds to ``stats[phase][key]``.

    ``key`` = (collective type, group label, tag), where tag separates the q/k-norm sum-of-squares
    all-reduces (tensors whose last dim is 1) from the rest. ``group_labels`` maps process groups to
    names ("tp", "cp"); others are labelled by their size.
    """

    def __init__(self, group_labels: dict | None = None):
        self.group_labels = group_labels or {}
        self.phase = "untracked"
        self.stats = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))  # calls, buffer, wire
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    # ---- accounting --------------------------------------------------------------------------

    def _group(self, group):
        g = group if group is not None else c10d._get_default_group()
        n = dist.get_world_size(g)
        for label, known in self.group_labels.items():
            if known is g:
                return label, n
        return f"group{n}", n

    def _record(self, name, args, kwargs):
        kind = CANONICAL.get(name, name)
        group = kwargs.get("group")
        tag = ""
        if kind in ("all_gather_into_tensor",):
            out, inp = _arg(args, kwargs, 0, "output_tensor"), _arg(args, kwargs, 1, "input_tensor")
            group = group if group is not None else _arg(args, kwargs, 2, "group")
            label, n = self._group(group)
            buffer, wire = _nbytes(out), _nbytes(inp) * (n - 1)
        elif kind == "all_gather":
            outs, inp = _arg(args, kwargs, 0, "tensor_list"), _arg(args, kwargs, 1, "tensor")
            group = group if group is not None else _arg(args, kwargs, 2, "group")
            label, n = self._group(group)
            buffer, wire = sum(_nbytes(t) for t in outs), _nbytes(inp) * (n - 1)
        elif kind == "reduce_scatter_tensor":
            out, inp = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 1, "input")
            group = group if group is not None else _arg(args, kwargs, 3, "group")
            label, n = self._group(group)
            buffer, wire = _nbytes(inp), _nbytes(out) * (n - 1)
        elif kind == "reduce_scatter":
            out, ins = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 1, "input_list")
            group = group if group is not None else _arg(args, kwargs, 3, "group")
            label, n = self._group(group)
            buffer, wire = sum(_nbytes(t) for t in ins), _nbytes(out) * (n - 1)
        elif kind == "all_reduce":
            t = _arg(args, kwargs, 0, "tensor")
            group = group if group is not None else _arg(args, kwargs, 2, "group")
            label, n = self._group(group)
            buffer, wire = _nbytes(t), 2 * _nbytes(t) * (n - 1) / n
            tag = "qk-norm sum-sq" if t.shape[-1] == 1 else ""
        elif kind == "all_to_all_single":
            out, inp = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 1, "input")
            splits = _arg(args, kwargs, 3, "input_split_sizes")
            group = group if group is not None else _arg(args, kwargs, 4, "group")
            label, n = self._group(group)
            buffer = _nbytes(inp)
            if splits:
                row = _nbytes(inp) // max(inp.shape[0], 1)
                me = dist.get_rank(group)
                wire = (sum(splits) - splits[me]) * row
            else:
                wire = buffer * (n - 1) / n
        elif kind == "all_to_all":
            outs, ins = _arg(args, kwargs, 0, "output_tensor_list"), _arg(args, kwargs, 1, "input_tensor_list")
            group = group if group is not None else _arg(args, kwargs, 2, "group")
            label, n = self._group(group)
            me = dist.get_rank(group)
            buffer = sum(_nbytes(t) for t in ins)
            wire = buffer - _nbytes(ins[me])
        elif kind == "batch_isend_irecv":  # ring attention: wire = what this rank sends, buffer = sent + received
            ops = _arg(args, kwargs, 0, "p2p_op_list")
            label, n = self._group(ops[0].group)
            sends = [op for op in ops if getattr(op.op, "__wrapped__", op.op).__name__ == "isend"]
            wire = sum(_nbytes(op.tensor) for op in sends)
            buffer = sum(_nbytes(op.tensor) for op in ops)
        else:  # other point-to-point and rooted collectives: not expected in the DiT; count the tensor once
            t = args[0] if args else next(iter(kwargs.values()))
            label, n = self._group(group)
            tensors = t if isinstance(t, (list, tuple)) else [t]
            buffer = wire = sum(_nbytes(x) for x in tensors if isinstance(x, torch.Tensor))
        entry = self.stats[self.phase][(kind, label, tag)]
        entry[0] += 1
        entry[1] += buffer
        entry[2] += wire

    def _wrap(self, name, fn):
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if depth == 0:
                counter._record(name, args, kwargs)
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        wrapper.__wrapped__ = fn
        return wrapper

    # ---- patching ----------------------------------------------------------------------------

    def __enter__(self):
        originals = {name: getattr(c10d, name) for name in WRAPPED if hasattr(c10d, name)}
        wrappers = {id(fn): self._wrap(name, fn) for name, fn in originals.items()}
        modules = [dist, c10d] + [m for n, m in list(sys.modules.items())
                                  if m is not None and n.split(".")[0] in ("megatron", "megawan")]
        for mod in modules:
            for attr, val in list(vars(mod).items()):
                if callable(val) and id(val) in wrappers and any(val is fn for fn in originals.values()):
                    self._saved.append((mod, attr, val))
                    setattr(mod, attr, wrappers[id(val)])
        return self

    def __exit__(self, *exc):
        for mod, attr, val in reversed(self._saved):
            setattr(mod, attr, val)
        self._saved.clear()
        return False

    def snapshot(self) -> dict:
        """{phase: {key: (calls, buffer_bytes, wire_bytes)}} as plain data."""
        return {ph: {k: tuple(v) for k, v in d.items()} for ph, d in self.stats.items()}
