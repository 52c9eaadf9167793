"""Requests to stop: SIGTERM / SIGUSR1 (a scheduler), SIGINT (Ctrl-C) and a stop file (the SLURM batch shell).

Each asks the trainer to stop at the next step boundary with a checkpoint (all ranks agree there and exit 0).
A second Ctrl-C stops the process at once, without a checkpoint (exit status 130), even while it waits in a
collective: a watcher thread reads the signal numbers that Python's C-level handler writes to
``signal.set_wakeup_fd`` the moment a signal arrives (the Python-level handler itself only runs once the main
thread is back in the interpreter). Each Ctrl-C prints one line (rank 0).

``megawan.train.main`` installs this before it imports torch, megatron or the config, so a signal during the
slow start-up is kept and becomes a checkpoint at the first step boundary. A signal during the interpreter's
own start-up, before ``main``'s first line, still has its default action (it ends the process): that is why
launch/slurm/job.sh does not signal the ranks but writes the stop file named by ``$MEGAWAN_STOP_FILE``, which
rank 0 looks for at every step boundary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_FILE_ENV = "MEGAWAN_STOP_FILE"
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a process ended by Ctrl-C


@contextlib.contextmanager
def stop_signals_kept_from_children():
    """Around code that starts processes (megatron's checkpoint writers are forked, its results queue is a
    spawned manager): the main thread blocks the stop signals, so the children start with them blocked and
    a Ctrl-C sent to the whole process group does not kill them half-way (nor print their tracebacks). This
    process still gets the signals: the kernel hands them to a thread that does not block them (the watcher
    of StopRequest), and a blocked one is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _launch_rank() -> int:
    """This process's global rank from the launcher's variables (torchrun or srun), before torch is imported."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


class StopRequest:
    """``requested`` turns true on SIGTERM, SIGUSR1, the first SIGINT, or (rank 0) once the stop file exists."""

    def __init__(self, stop_file: str | None = None, rank: int | None = None):
        rank = _launch_rank() if rank is None else rank
        self.announce = rank == 0
        # only rank 0 looks (one stat per step); the ranks' all-reduce at the step boundary tells the others
        self.stop_file = (stop_file or os.environ.get(STOP_FILE_ENV) or None) if rank == 0 else None
        self.signal_name: str | None = None
        self.interrupts = 0
        self._previous: dict = {}
        self._previous_wakeup_fd: int | None = None
        self._socks: tuple[socket.socket, socket.socket] | None = None
        self._on_abort: list = []
        self._fork_hook = False

    @property
    def requested(self) -> bool:
        if self.signal_name is not None:
            return True
        if self.stop_file is not None and os.path.exists(self.stop_file):
            self.signal_name = "the stop file"
            return True
        return False

    def on_abort(self, callback) -> None:
        """Run ``callback()`` before a second Ctrl-C ends the process (e.g. release the run folder's lock)."""
        self._on_abort.append(callback)

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            self._previous.setdefault(s, signal.signal(s, self._on_signal))
        if not self._fork_hook:  # a forked child (a data worker) leaves stopping to this process
            os.register_at_fork(after_in_child=self._in_forked_child)
            self._fork_hook = True
        if self._socks is None and threading.current_thread() is threading.main_thread():
            reader, writer = socket.socketpair()
            reader.setblocking(True)
            writer.setblocking(False)
            try:
                self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            except ValueError:  # not possible here: the Python-level handler counts Ctrl-C instead
                reader.close()
                writer.close()
            else:
                self._socks = (reader, writer)
                threading.Thread(target=self._watch, args=(reader,), name="megawan-stop-watcher",
                                 daemon=True).start()
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._socks is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            for sock in self._socks:
                sock.close()  # ends the watcher's recv
            self._socks = None

    # ---- internals ------------------------------------------------------------------------------

    def _in_forked_child(self) -> None:
        if self._socks is None:
            return
        self._socks = None  # the watcher thread does not exist here; the sockets are the parent's
        self._previous.clear()
        signal.set_wakeup_fd(-1)  # else a signal to the child would reach the parent's watcher as its own
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT and self._socks is None:
            self._interrupt()

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == signal.SIGINT:
                    self._interrupt()

    def _interrupt(self) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.signal_name = self.signal_name or "SIGINT"
            self._say("Ctrl-C: stopping at the next step boundary with a checkpoint "
                      "(Ctrl-C again stops at once, without one)")
            return
        self._say("Ctrl-C again: stopped at once (a checkpoint being written is abandoned; a rerun resumes from "
                  "the newest complete one)")
        for callback in self._on_abort:
            try:
                callback()
            except Exception:  # noqa: BLE001 - stopping at once matters more than tidying up
                pass
        os._exit(INTERRUPTED_EXIT)

    def _say(self, line: str) -> None:
        if self.announce:
            os.write(2, (line + "\n").encode())  # not print(): the main thread may hold sys.stderr's lock
