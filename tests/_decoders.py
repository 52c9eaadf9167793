"""Which decoder backends a test machine must have, so a backend that fails to import fails the run
instead of vanishing from the parametrisation.

``MEGAWAN_EXPECT_DECODERS="torchcodec,pyav,decord"`` (set by ``.ci/run``) names the expected backends;
PyAV is a hard dependency and always expected. A missing expected backend fails; any other missing one
skips with the reason (``pytest -rs``)."""

from __future__ import annotations

import os

import pytest

from megawan.data.decoders import DISABLE_ENV, available_backends, disabled_backends

EXPECT_ENV = "MEGAWAN_EXPECT_DECODERS"
CPU_BACKENDS = ("torchcodec", "pyav", "decord")  # decode to identical pixels (FFmpeg's swscale)


def expected_backends() -> set[str]:
    return {"pyav"} | {n.strip() for n in os.environ.get(EXPECT_ENV, "").split(",") if n.strip()}


def require_backend(name: str) -> None:
    """Return if ``name`` is usable here; fail if it is expected, skip with the reason otherwise."""
    if name in available_backends():
        return
    why = (f"disabled by {DISABLE_ENV}" if name in disabled_backends()
           else "not importable here (torchcodec needs FFmpeg's shared libraries)")
    if name in expected_backends():
        pytest.fail(f"decoder backend {name} is expected ({EXPECT_ENV} / PyAV always) but {why}")
    pytest.skip(f"decoder backend {name} {why}")
