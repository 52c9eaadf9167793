"""What to do with bad input (corrupt video, mismatched or NaN states, short segments, decode errors).

Every problem is reported with the file and the frame index it was found at. Under ``policy="skip"`` it is
logged and counted (the counts travel with batches, so the main process sees what its loader workers hit);
under ``policy="raise"`` it stops the job with a ``BadInputError``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal

logger = logging.getLogger("megawan.data")

BadInputPolicy = Literal["skip", "raise"]

# Kinds of problem, used as counter keys.
UNREADABLE_VIDEO = "unreadable_video"
LENGTH_MISMATCH = "length_mismatch"
SHORT_SEGMENT = "short_segment"
NAN_STATES = "nan_states"
DECODE_ERROR = "decode_error"
SHORT_VIDEO = "short_video"


class BadInputError(RuntimeError):
    """A problem with one input file, located by file and frame index."""

    def __init__(self, kind: str, path: str, frame: int | None, detail: str):
        self.kind, self.path, self.frame, self.detail = kind, str(path), frame, detail
        where = f"{path}" if frame is None else f"{path} at frame {frame}"
        super().__init__(f"[{kind}] {where}: {detail}")


@dataclass
class BadInputReport:
    """Applies the policy and counts what was skipped."""

    policy: BadInputPolicy = "skip"

    def __post_init__(self):
        if self.policy not in ("skip", "raise"):
            raise ValueError(f"bad-input policy must be 'skip' or 'raise', got {self.policy!r}")
        self.counts: Counter[str] = Counter()

    def __call__(self, error: BadInputError, count: int = 1) -> None:
        """Raise ``error`` under the raise policy; otherwise log it and add ``count`` to its kind."""
        if self.policy == "raise":
            raise error
        self.counts[error.kind] += count
        logger.warning("skipping bad input: %s", error)


def load_with_replacement(load: Callable[[int], dict], index: int, num_items: int, report: BadInputReport,
                          max_retries: int, stride: int = 1, what: str = "items") -> dict:
    """``load(index)``, or, when that input is bad, the next good one ``stride`` items further on.

    Each bad input goes through ``report`` (raise, or log and count); the kinds skipped travel with
    the sample under "skipped", so every data-parallel rank still yields a full batch and stays in step.
    """
    skipped = []
    for attempt in range(max_retries + 1):
        try:
            sample = load((index + attempt * stride) % num_items)
        except BadInputError as e:
            report(e)
            skipped.append(e.kind)
            continue
        sample["skipped"] = skipped
        return sample
    raise RuntimeError(f"{len(skipped)} bad {what} in a row from {index}: {skipped}")
