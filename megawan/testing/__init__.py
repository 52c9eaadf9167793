"""Helpers for megawan's tests: a multi-process launcher (gloo on CPU, NCCL on GPUs)."""

from megawan.testing.distributed import run_distributed, test_backend

__all__ = ["run_distributed", "test_backend"]
