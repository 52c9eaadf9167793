"""Progress of a long loop: a tqdm bar on a terminal, a plain line every few seconds anywhere else.

A bar redraws itself with carriage returns; in a log file (SLURM's, or a pipe through a launcher) those
never end a line, so the next message is glued onto the bar's last state. When the bar's stream is not a
terminal this prints, instead, one ordinary line at most every ``every_s`` seconds (and at the end), with
the position, the rate over this process's share of the work and the time left:

    train: 120/1000 steps (12%), 1.93 steps/s, ETA 0:07:36, loss 0.4312, lr 1.00e-04

``write(line)`` prints a message so that it never lands inside the bar. Only the caller's rank prints:
pass ``enabled=False`` elsewhere. A task that starts after a silence and may take a while (validation, rollouts)
passes ``start_line=True``: its first line comes at once, not ``every_s`` seconds later, and ``leave=False``
takes its bar off the terminal when it is done (the training bar stays).
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressLine:
    def __init__(self, total: int | None, *, desc: str, unit: str = "step", initial: int = 0, every_s: float = 30.0,
                 enabled: bool = True, bar: bool | None = None, stream=None, out=None, clock=time.monotonic,
                 start_line: bool = False, leave: bool = True):
        """``bar``: None picks a tqdm bar when ``stream`` (stderr by default) is a terminal; plain lines go to
        ``out`` (stdout by default, where the other messages go, so they stay in order)."""
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.clock = clock
        self.initial = self.n = initial
        self.postfix: dict = {}
        self._t0 = self._last = clock()
        self._bar = None
        if not enabled:
            return
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream,
                             leave=leave)
        elif start_line:
            self._print(self.line())

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: int, **postfix) -> None:
        """The position is now ``n`` (absolute); ``postfix`` values are shown beside it."""
        if not self.enabled:
            return
        self.n = n
        self.postfix = postfix
        if self._bar is not None:
            self._bar.update(n - self._bar.n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = self.clock()
        if now - self._last >= self.every_s or (self.total is not None and n >= self.total):
            self._last = now
            self._print(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        done, spent = self.n - self.initial, max(now - self._t0, 1e-9)
        units = f"{self.unit}s"
        parts = [f"{self.desc}: {self.n}/{self.total} {units} ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.desc}: {self.n} {units}"]
        if done > 0:
            rate = done / spent
            parts.append(f"{rate:.3g} {units}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if self.total:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def write(self, line: str) -> None:
        """A message line (outside the bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.out)  # tqdm lifts the bar off the terminal first
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
