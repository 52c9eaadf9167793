"""What to do with bad input (corrupt video, mismatched or NaN states, short segments, decode errors).

Every problem is described with the file and the frame index it was found at (a ``BadInput``). Under
``policy="skip"`` it is counted and the input skipped; under ``policy="raise"`` it stops the job with a
``BadInputError``.

Who says what, so that a bad file is named once and not once per occurrence, worker or rank:

- ``BadInputReport`` (one per dataset, or shared) names each file once per process, the first time it is
  found, unless told not to (``announce=False``: the trainer, which reports for the whole job). Loader workers
  never print: what they skip travels with the sample under "skipped" (a list of ``BadInput``) and is named
  by the process that receives the batch (``ClipLoader``), so workers that hit the same file print nothing twice.
- ``BadInputTally`` keeps what one process skipped: counts by kind, each (kind, file)'s first notice, and what
  is new since it was last read (``take``). The trainer gathers the tallies of all ranks on rank 0, which names
  each file once for the job, prints a count per logging interval and a summary at the end
  (``megawan.training.bad_input_log``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal

import torch.utils.data

logger = logging.getLogger("megawan.data")

BadInputPolicy = Literal["skip", "raise"]

# Kinds of problem, used as counter keys.
UNREADABLE_VIDEO = "unreadable_video"
LENGTH_MISMATCH = "length_mismatch"
SHORT_SEGMENT = "short_segment"
NAN_STATES = "nan_states"
DECODE_ERROR = "decode_error"
SHORT_VIDEO = "short_video"


@dataclass(frozen=True)
class BadInput:
    """One problem found: its kind, the file and frame, what is wrong, and how many items it stands for
    (rows of NaN states, short segments; 1 for a skipped clip)."""

    kind: str
    path: str
    frame: int | None
    detail: str
    count: int = 1

    def __str__(self) -> str:
        where = self.path if self.frame is None else f"{self.path} at frame {self.frame}"
        return f"[{self.kind}] {where}: {self.detail}"


class BadInputError(RuntimeError):
    """A problem with one input file, located by file and frame index."""

    def __init__(self, kind: str, path: str, frame: int | None, detail: str):
        self.kind, self.path, self.frame, self.detail = kind, str(path), frame, detail
        super().__init__(str(self.notice()))

    def notice(self, count: int = 1) -> BadInput:
        return BadInput(self.kind, self.path, self.frame, self.detail, count)


def count_by_kind(notices) -> Counter[str]:
    counts: Counter[str] = Counter()
    for n in notices:
        counts[n.kind] += n.count
    return counts


class BadInputTally:
    """What one process skipped: ``counts`` by kind, the first notice of each (kind, file), and what is new
    since the last ``take`` (bounded by the number of bad files, however often they are hit)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.first: dict[tuple[str, str], BadInput] = {}
        self._new: list[BadInput] = []
        self._since: Counter[str] = Counter()

    def add(self, notice: BadInput) -> bool:
        """Count ``notice``; True when its (kind, file) is new."""
        self.counts[notice.kind] += notice.count
        self._since[notice.kind] += notice.count
        key = (notice.kind, notice.path)
        if key in self.first:
            return False
        self.first[key] = notice
        self._new.append(notice)
        return True

    def take(self) -> tuple[list[BadInput], Counter[str]]:
        """(first notices of the (kind, file)s new since the last take, counts since the last take)."""
        new, since = self._new, self._since
        self._new, self._since = [], Counter()
        return new, since


class BadInputReport:
    """Applies the policy and counts what was skipped; names each file once (``announce``, outside loader
    workers).

    ``tally`` holds what was reported here and is not carried by a sample (the dataset's construction checks);
    ``counts`` holds everything reported here (construction checks and the clips replaced in this process).
    """

    def __init__(self, policy: BadInputPolicy = "skip", *, announce: bool = True):
        if policy not in ("skip", "raise"):
            raise ValueError(f"bad-input policy must be 'skip' or 'raise', got {policy!r}")
        self.policy, self.announce = policy, announce
        self.counts: Counter[str] = Counter()
        self.tally = BadInputTally()
        self._named: set[str] = set()

    def __call__(self, error: BadInputError, count: int = 1, *, carried: bool = False) -> BadInput:
        """Raise ``error`` under the raise policy; otherwise count it (``count`` items) and return its notice.
        ``carried``: the notice travels with the sample (its receiver tallies it), so it stays out of ``tally``."""
        if self.policy == "raise":
            raise error
        notice = error.notice(count)
        self.counts[notice.kind] += count
        if not carried:
            self.tally.add(notice)
        if torch.utils.data.get_worker_info() is None:  # a worker's notices are named by the batch's receiver
            self.name_once(notice)
        return notice

    def name_once(self, notice: BadInput) -> None:
        """Log ``notice`` if its file has not been named by this report yet (and the report announces)."""
        if self.announce and notice.path not in self._named:
            self._named.add(notice.path)
            logger.warning("bad input (skipped; later ones of this file are only counted): %s", notice)


def retry_stride(num_items: int) -> int:
    """How far each retry of a bad item jumps: ~0.618 of the dataset (the golden ratio's fraction).

    Damage comes in stretches of consecutive items (the clips of one truncated video), so a retry must
    land far away, and so must the next ones, for every dataset size. Successive multiples of the
    golden fraction spread out as evenly as any sequence can (none falls near an earlier one); a fixed
    stride does not (7919 is -1 modulo 120: it walked through the damage one clip at a time).
    """
    return max(1, round(num_items * (math.sqrt(5) - 1) / 2))


def load_with_replacement(load: Callable[[int], dict], index: int, num_items: int, report: BadInputReport,
                          max_retries: int, what: str = "items") -> dict:
    """``load(index)``, or, when that input is bad, a good one elsewhere (jumps of ``retry_stride``).

    Each bad input goes through ``report`` (raise, or count); its notice travels with the sample under
    "skipped" (a list of ``BadInput``), so every data-parallel rank still yields a full batch and stays in step,
    and the process that receives the sample (from a loader worker or not) knows what was skipped.
    """
    skipped: list[BadInput] = []
    stride = retry_stride(num_items)
    for attempt in range(max_retries + 1):
        try:
            sample = load((index + attempt * stride) % num_items)
        except BadInputError as e:
            skipped.append(report(e, carried=True))
            continue
        sample["skipped"] = skipped
        return sample
    raise RuntimeError(f"{len(skipped)} bad {what} in a row from {index}: {[n.kind for n in skipped]}")
