"""Third-party notices that tell a megawan user nothing, silenced in one place.

Every rank imports the same libraries, so each of these would print once per rank on every start. Each entry
says why it is harmless here; anything not listed still shows. ``quiet_known_notices()`` is called by every
command before it imports megatron-core (the first notice comes at import), so this module imports only the
standard library.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category): Python warnings
KNOWN_WARNINGS = (
    # megatron-core's pure-torch fallbacks for fused kernels (multi_tensor_*, optimizers): megawan uses its
    # own DDP buffers and torch optimizers through megatron's local implementations, on CPU as on GPU
    (r"Transformer Engine and Apex are not installed", UserWarning),
)

# logger name -> message regexes: log records of libraries (a filter on a logger sees only its own records,
# so each logger that emits is named)
KNOWN_LOG_RECORDS = {
    # torchao's optional extension kernels (MX-FP8, CUTLASS for sm90a), built for another Python here:
    # megawan's FP8 path uses torchao.float8 and torch._scaled_mm, not these
    "torchao": (r"Failed to load .*torchao/_C",),
    # torchao's int-mm kernels without Triton: megawan does not call them
    "torchao.kernel.intmm": (r"Detected no triton",),
    # torch deprecates torchao's register_constant() of enums (torchao's to change; nothing for a user to do)
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported",),
}


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_notices() -> None:
    """Drop the known-harmless notices above (idempotent: a second call adds nothing)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(patterns))
