"""Calls a rank function of tests/_te_workers.py in a spawned rank, importing it (and so installing the fake
Transformer Engine) only there: the test process itself never sees the fake. Imports nothing else."""


def call(name: str, *args):
    from tests import _te_workers

    return getattr(_te_workers, name)(*args)
