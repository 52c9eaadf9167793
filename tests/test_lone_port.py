"""A lone ``python -m megawan.train`` (no torchrun, no SLURM) rendezvouses on a free port of its own, not on
29500: two lone runs on one machine at once must not collide. A launcher's or SLURM's port is kept."""

from __future__ import annotations

import socket

import pytest

from megawan.parallel_state.launch import launch_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@pytest.fixture
def lone(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def test_a_lone_run_takes_a_free_port_while_another_holds_one(lone):
    first = launch_env()
    assert (first["rank"], first["world_size"], first["master_addr"]) == (0, 1, "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # the first lone run's rendezvous
        held.bind(("", int(first["master_port"])))
        held.listen()
        second = launch_env()
        assert second["master_port"] != first["master_port"] and second["master_port"] != "29500"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", int(second["master_port"])))  # free: binding it does not raise


def test_a_launchers_port_is_kept(lone, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert launch_env()["master_port"] == "29511"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc 1 without MASTER_PORT: the default rendezvous
    assert launch_env()["master_port"] == "29500"
