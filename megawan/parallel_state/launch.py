"""The launcher's environment (torchrun or SLURM) and starting torch.distributed from it."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys

import torch.distributed as dist

TIMEOUT_ENV = "MEGAWAN_DIST_TIMEOUT_S"


def default_timeout_s() -> int:
    """The collective timeout: $MEGAWAN_DIST_TIMEOUT_S, else 600 s (read when a job starts, not at import)."""
    return int(os.environ.get(TIMEOUT_ENV, "600"))


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_env() -> dict:
    """Rank, world size, local rank and rendezvous address from torchrun or SLURM (srun) variables."""
    env = os.environ
    lone = False
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local, lone = 0, 1, 0, True
    addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    port = env.get("MASTER_PORT")
    if port is None:
        job = env.get("SLURM_JOB_ID")
        # a lone process (no launcher) meets nobody: any free port, so two lone runs on a machine never
        # collide on the default one
        port = str(20000 + int(job) % 20000) if job else str(free_port()) if lone else "29500"
    return {"rank": rank, "world_size": world, "local_rank": local, "master_addr": addr, "master_port": port}


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it). Another process could take it before the
    rendezvous binds it, as with torchrun --standalone; the window is the few lines until then."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_process_group(env: dict, backend: str, timeout_s: int) -> None:
    """Join the rendezvous described by ``env`` (from ``launch_env``), unless a group already runs."""
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env['master_addr']}:{env['master_port']}",
        rank=env["rank"],
        world_size=env["world_size"],
        timeout=datetime.timedelta(seconds=timeout_s),
    )


STARTUP_ERROR_EXIT = 3  # launch/torchrun.sh keeps torchrun's child-failure report out for this status
DEBUG_ENV = "MEGAWAN_DEBUG"  # MEGAWAN_DEBUG=1: user errors raise with their traceback (as --debug does)


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or MEGAWAN_DEBUG set to anything but empty / 0 / false / no."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def startup_error(error: Exception, rank: int | None = None, what: str = "the job did not start"):
    """A configuration problem is the same on every rank: say it once (rank 0, one line on stderr, no
    traceback) and exit with STARTUP_ERROR_EXIT on every rank."""
    rank = launch_env()["rank"] if rank is None else rank
    if rank == 0:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"FAIL: {what}: {type(error).__name__}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(STARTUP_ERROR_EXIT)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException], rank: int | None = None, debug: bool = False,
                what: str = "the job did not start"):
    """The command lines' one way of reporting bad input: an exception of ``kinds`` raised inside the block
    becomes ``startup_error`` (one line from rank 0, exit 3 on every rank) unless ``--debug`` / MEGAWAN_DEBUG
    asks for the traceback. Wrap only the checking of arguments and inputs: a failure later, inside a model,
    keeps its traceback."""
    try:
        yield
    except kinds as e:
        if debug_requested(debug):
            raise
        startup_error(e, rank, what)
