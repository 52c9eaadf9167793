"""Run a function on N local ranks, the way torchrun would, and collect results or failures.

The same test runs with gloo on CPU everywhere and with NCCL (one rank per GPU) when
``MEGAWAN_TEST_BACKEND=nccl`` is set (see ``test_backend``: a test needing more GPUs than the
machine has is skipped).
A rank that raises or dies fails the call with its traceback or exit code; a hang fails it after
``timeout_s``.

Gloo ranks start from a fork server that has already imported torch, megatron-core and megawan (each
spawned rank would otherwise spend ~4 s of CPU importing them again: most of a small test's time on a
2-core machine). Each rank is still a fresh process forked from that clean server, so nothing is shared
between tests; it gets the caller's current environment and writes to the caller's current stdout and stderr
(pytest's capture of the test at hand), as a spawned rank would. NCCL ranks are spawned: a process that has
touched CUDA must not be forked, and the fork server's imports may query CUDA. ``fresh=True`` spawns gloo
ranks too, for a test that must control what a rank imports first (the fake Transformer Engine).
"""

from __future__ import annotations

import io
import os
import queue as _queue
import socket
import time
import traceback
import unittest
from multiprocessing import reduction

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def test_backend(world_size: int) -> str:
    """The backend for ``world_size`` ranks: $MEGAWAN_TEST_BACKEND ('gloo', the default, or 'nccl').

    NCCL needs one GPU per rank: with fewer, this raises ``unittest.SkipTest`` naming the shortfall
    (pytest reports it as a skip), rather than quietly testing gloo instead of what was asked for.
    """
    want = os.environ.get("MEGAWAN_TEST_BACKEND", "gloo")
    if want not in ("gloo", "nccl"):
        raise ValueError(f"MEGAWAN_TEST_BACKEND must be 'gloo' or 'nccl', got {want!r}")
    if want == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world_size:
            raise unittest.SkipTest(f"MEGAWAN_TEST_BACKEND=nccl: this test needs {world_size} GPUs, "
                                    f"the machine has {gpus}")
    return want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the fork server imports once, before it forks any rank (names that fail to import are skipped).
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megawan.training.trainer", "megawan.pipelines.sampling",
            "megawan.evaluation.rollouts"]


def _context(backend: str, fresh: bool):
    if backend != "gloo" or fresh:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts: the first gloo call
    return ctx


class _CallersFd:
    """The caller's file descriptor ``fd`` as it is now, handed to a rank when the rank starts (a forked rank
    would otherwise inherit the fork server's, i.e. wherever stdout / stderr went when the server started)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):  # runs while the rank starts: the fd travels with it (duplicated, any start method)
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup) -> int:
    return dup.detach()


def _worker(rank, world_size, port, backend, call, results, environ, stdout_fd, stderr_fd):
    # A forked rank inherits the fork server's environment and output, as of when it started: use the caller's.
    os.environ.clear()
    os.environ.update(environ)
    for fd, target in ((stdout_fd, 1), (stderr_fd, 2)):
        if fd != target:  # a spawned rank may receive them as the very same numbers
            os.dup2(fd, target)
            os.close(fd)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MEGAWAN_TEST_BACKEND=backend,
        MEGAWAN_BACKEND=backend,  # gloo keeps ranks on CPU even where some GPUs exist
    )
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # NCCL ranks: fp32 convs exact, as the 1e-5 tolerances assume
    try:
        fn, args, kwargs = torch.load(io.BytesIO(call), weights_only=False)
        result = fn(*args, **kwargs)
        # Serialise to bytes: tensors sent through a Queue use shared memory that dies with this rank.
        buf = io.BytesIO()
        torch.save(result, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs, results, timeout_s: float) -> tuple[dict, list[str]]:
    """Per-rank results until all reported, one failed or died, or ``timeout_s`` passed."""
    done: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(done) < len(procs) and not errors:
        try:
            rank, status, payload = results.get(timeout=1.0)
        except _queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
            if dead:  # killed or crashed without reporting (os._exit, OOM, signal)
                errors += [f"rank {r} exited with code {procs[r].exitcode} without a result" for r in dead]
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout_s}s waiting for ranks "
                              f"{sorted(set(range(len(procs))) - set(done))}")
            continue
        if status == "ok":
            done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    return done, errors


def run_distributed(fn, world_size: int, *args, timeout_s: float = 600, grace_s: float = 0.5, fresh: bool = False,
                    **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results.

    ``fn`` must be importable (module level) and should call ``megawan.parallel_state.initialize``.
    After a rank fails, the others (which may be blocked in a collective) get ``grace_s`` seconds to
    end by themselves before they are killed.
    """
    backend = test_backend(world_size)
    ctx = _context(backend, fresh)
    # Not daemonic: ranks may start processes of their own (megatron's checkpoint writer does); the
    # parent still kills every rank that outlives the call.
    results = ctx.Queue()
    port = _free_port()
    # The call goes as bytes, as results come back: tensors in it would otherwise travel as shared-memory
    # file descriptors, more than a fork server can pass to a rank (~250).
    call = io.BytesIO()
    torch.save((fn, args, kwargs), call)
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, daemon=False,
                         args=(r, world_size, port, backend, call.getvalue(), results, environ,
                               _CallersFd(1), _CallersFd(2)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    errors: list[str] = []
    try:
        done, errors = _collect(procs, results, timeout_s)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else grace_s)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [done[r] for r in range(world_size)]
