"""One run per run folder: a lock file naming its holder (host, pid, start time, SLURM job).

Two runs writing into one ``run.out_dir`` corrupt it (one run's checkpoint write removes the other's files,
``metrics.jsonl`` interleaves both), so rank 0 of a run takes ``<out_dir>/.megawan-run.lock`` before anything
else touches the folder, and a second run refuses at once, naming the holder. The lock is created with
``O_CREAT | O_EXCL`` (atomic on local and network file systems) rather than ``flock``, whose support on
cluster file systems varies, and it is released when the run ends.

A lock whose holder is certainly gone is taken over with a warning: its process no longer exists on this
host (the pid is gone, or now belongs to a process started later), or it was an earlier start of this same
SLURM job (SLURM ends one start of a job before it begins the next). A lock from another host that is not an
earlier start of this job cannot be checked from here: the refusal says to delete the file if that run is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import psutil

logger = logging.getLogger("megawan.train")

LOCK_NAME = ".megawan-run.lock"


class RunFolderLocked(RuntimeError):
    """Another run holds the run folder; the message names it."""


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def holder_info() -> dict:
    """What this process writes into the lock."""
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": env.get("SLURM_JOB_ID"), "slurm_restart": int(env.get("SLURM_RESTART_COUNT") or 0)}


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']} (restart {holder.get('slurm_restart', 0)})" \
        if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{job}"


def stale_reason(holder: dict, me: dict | None = None) -> str | None:
    """Why ``holder`` is certainly no longer running, or None when it may be."""
    me = me or holder_info()
    if holder.get("slurm_job") and holder["slurm_job"] == me.get("slurm_job") and \
            int(holder.get("slurm_restart") or 0) < int(me.get("slurm_restart") or 0):
        return "it was an earlier start of this SLURM job"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "it names no process"
    start = _process_start(pid)
    if start is None:
        return f"process {pid} no longer exists on this host"
    if holder.get("process_start") is not None and abs(start - holder["process_start"]) > 1.0:
        return f"pid {pid} now belongs to another process"
    return None


class RunLock:
    """``RunLock(out_dir).acquire()`` ... ``release()``; acquire raises RunFolderLocked naming the holder."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as a live holder we cannot name

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = holder_info()
        for _ in range(3):  # a lock can vanish or be taken over between our attempts
            if self._create(me):
                self.held = True
                return
            holder = self._read()
            if holder is None:
                continue
            reason = stale_reason(holder, me) if holder else None
            if reason is None:
                who = describe(holder) if holder else "an unreadable lock"
                raise RunFolderLocked(
                    f"run folder {self.path.parent} is in use by another run ({who}; lock file {self.path}): "
                    f"wait for it to end or use another run.out_dir; if that run no longer exists (its node "
                    f"went down), delete the lock file")
            if self._take_over(holder):
                logger.warning("run folder %s: took over the lock of a run that has ended (%s; %s)",
                               self.path.parent, describe(holder), reason)
                if self._create(me):
                    self.held = True
                    return
        raise RunFolderLocked(f"run folder {self.path.parent}: could not take its lock {self.path} "
                              f"(another run is starting there at the same time)")

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock aside, checking it is the one judged stale (not a new holder's)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # gone already: try to create ours
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != stale:  # a new run took it in between: put it back (unless yet another one exists)
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
