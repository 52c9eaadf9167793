"""CPU smoke test of bench/bench_train_gpu.py at tiny width: it runs end to end, and the two models it
times (megawan, diffusers' WanTransformer3DModel given megawan's weights) compute the same training step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import diffusers  # noqa: F401 - a test dependency (setup.py [test]): a missing one must fail, not skip


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_train_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_train_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_step_matches_diffusers():
    (r,) = _bench().main(["--tiny", "--cases", "80", "--repeats", "1"])
    assert r["tokens"] == 80 and r["megawan"] > 0 and r["diffusers"] > 0
    assert r["v_rel"] <= 1e-5  # fp32: only the summation order differs
    assert r["grad_rel"] <= 5e-5  # worst single tensor (small norm / bias grads amplify round-off)
