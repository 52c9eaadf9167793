"""Layout validation (before any compute), launcher environments and the CPU shims."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.parallel_state import LayoutError, ParallelLayout
from megawan.parallel_state.cpu_compat import CpuRNGStatesTracker
from megawan.testing import run_distributed


@pytest.mark.parametrize("world, tp, cp, rule", [
    (4, 5, 1, r"world_size % \(tp\*cp\)"),   # 4 ranks cannot hold tp=5
    (10, 5, 1, r"heads % tp == 0"),           # 24 heads are not divisible by tp=5
    (16, 4, 4, r"\(heads / tp\) % cp == 0"),  # 24/4 = 6 heads per TP rank, not divisible by cp=4
    (6, 4, 1, r"world_size % \(tp\*cp\)"),   # world size mismatch
    (8, 2, 0, r">= 1"),
])
def test_bad_layouts_name_the_rule(world, tp, cp, rule):
    ParallelLayout(8, 4, 2).validate(24)  # a valid TI2V-5B layout passes
    with pytest.raises(LayoutError, match=rule):
        ParallelLayout(world, tp, cp).validate(24)


def test_initialize_fails_before_any_process_group():
    # A fresh process in a 4-rank torchrun environment with tp=5 must fail at once: a rendezvous
    # attempt would wait for 3 ranks that never come (MASTER_PORT 1 has no listener).
    code = ("from megawan import parallel_state\n"
            "try:\n"
            "    parallel_state.initialize(tp=5)\n"
            "except parallel_state.LayoutError as e:\n"
            "    import torch.distributed as dist\n"
            "    print('LayoutError:', e, '| process group started:', dist.is_initialized())\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "LayoutError: world size 4 is not divisible by tp=5" in out.stdout, out.stderr[-2000:]
    assert "process group started: False" in out.stdout


def test_model_validates_its_own_head_count():
    from megawan.models.dit import WanDiT
    from megawan.models.dit_config import WanDiTConfig
    from megawan.parallel_state import ParallelGroups

    groups = ParallelGroups(None, None, None, None, None, tp=4, cp=2, dp=1, tp_rank=0, cp_rank=0, dp_rank=0,
                            device=torch.device("cpu"))
    cfg = WanDiTConfig(dim=64, ffn_dim=64, num_heads=4, num_layers=1, text_dim=8)
    with pytest.raises(LayoutError, match=r"\(heads / tp\) % cp == 0"):
        WanDiT(cfg, groups)


def test_slurm_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-004,007]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = parallel_state.launch_env()
    assert env == {"rank": 5, "world_size": 8, "local_rank": 1, "master_addr": "gpu003",
                   "master_port": str(20000 + 123456 % 20000)}


def test_cpu_rng_tracker_forks_reproducibly():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, b)  # the forked stream advances
    with pytest.raises(ValueError):
        tracker.add("other", 7)


def _groups_of_rank():
    g = parallel_state.initialize(tp=2, cp=2, vae_shards=4)
    import torch.distributed as dist

    return (dist.get_rank(), g.tp_rank, g.cp_rank, g.dp_rank, dist.get_world_size(g.vae_group),
            dist.get_process_group_ranks(g.tp_group), dist.get_process_group_ranks(g.cp_group))


def test_groups_on_four_ranks():
    res = run_distributed(_groups_of_rank, 4)
    # megatron's order tp-cp-dp: TP is the fastest-varying coordinate
    assert [(r[1], r[2], r[3]) for r in res] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert res[0][5] == [0, 1] and res[0][6] == [0, 2] and all(r[4] == 4 for r in res)


def _lose_a_rank(result_file):
    import json
    import time

    import torch.distributed as dist

    groups = parallel_state.initialize(tp=2, num_heads=None, timeout_s=20)
    dist.all_reduce(torch.ones(4), group=groups.tp_group)  # a healthy step first: the pair is connected
    if dist.get_rank() == 1:
        os._exit(3)  # a rank dies without a word
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=groups.tp_group)
        outcome = "completed"
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError subclasses
        outcome = f"{type(e).__name__}: {e}"
    with open(result_file, "w") as f:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - start}, f)
    os._exit(0)  # skip tearing down a group whose peer is gone


def test_a_dead_rank_fails_the_survivors_instead_of_hanging(tmp_path):
    import json

    with pytest.raises(RuntimeError, match="rank 1 exited with code 3"):
        run_distributed(_lose_a_rank, 2, tmp_path / "rank0.json", timeout_s=120, grace_s=60)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["outcome"] != "completed" and report["seconds"] < 60, report


def _single_rank_layout():
    import torch.distributed as dist

    parallel_state.initialize(tp=2)
    one = parallel_state.ParallelGroups.single_rank(torch.device("cpu"))
    return ((one.tp, one.cp, one.dp, one.tp_rank, one.cp_rank, one.dp_rank),
            [dist.get_process_group_ranks(g) for g in (one.tp_group, one.cp_group, one.dp_group,
                                                       one.dp_cp_group, one.vae_group)])


def test_single_rank_groups_inside_a_two_rank_job():
    for rank, (coords, ranks) in enumerate(run_distributed(_single_rank_layout, 2)):
        assert coords == (1, 1, 1, 0, 0, 0)
        assert ranks == [[rank]] * 5  # every group holds this rank alone


def test_get_groups_says_what_it_starts():
    code = ("import warnings\n"
            "import torch.distributed as dist\n"
            "from megawan import parallel_state\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    g = parallel_state.get_groups()\n"
            "print([str(x.message) for x in w if 'get_groups' in str(x.message)])\n"
            "print(dist.get_world_size(), dist.get_backend(), g.tp, g.cp, g.dp)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert "starting a 1-rank gloo process group" in lines[-2], out.stderr[-2000:]
    assert lines[-1] == "1 gloo 1 1 1"

def _sp_gather_with_cuda_present():
    """A gloo rank on a machine that reports CUDA: megatron's SP gather must still run on CPU."""
    torch.cuda.is_available = lambda: True  # what a GPU node reports; this torch may have no CUDA at all
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    import torch.distributed as dist

    groups = parallel_state.initialize(tp=2, num_heads=None, backend="gloo")
    x = torch.full((2, 3), float(dist.get_rank()))
    gathered = gather_from_sequence_parallel_region(x, group=groups.tp_group)
    with get_cuda_rng_tracker().fork():  # megatron's model-parallel RNG: the CPU stand-in
        torch.rand(1)
    return str(groups.device), gathered


def test_gloo_ranks_on_a_gpu_machine_get_the_cpu_stand_ins(monkeypatch):
    """MEGAWAN_BACKEND=gloo (the test harness's default) keeps ranks on CPU where CUDA exists; megatron's
    gathers allocate on torch.cuda.current_device() and must get CPU there, not cuda:0."""
    monkeypatch.setenv("MEGAWAN_TEST_BACKEND", "gloo")  # this checks gloo ranks, also in an NCCL test run
    for device, gathered in run_distributed(_sp_gather_with_cuda_present, 2):
        assert device == "cpu"
        assert gathered.device.type == "cpu"
        assert torch.equal(gathered, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))


def _timeout_seen():
    parallel_state.initialize(backend="gloo")
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return os.environ.get("MEGAWAN_DIST_TIMEOUT_S"), backend.options._timeout.total_seconds()


def test_ranks_see_the_callers_environment_of_now(monkeypatch):
    """Gloo ranks fork from a server started by an earlier test: they still get the caller's environment of
    the moment, and MEGAWAN_DIST_TIMEOUT_S is read when a job starts (a dead-rank test shortens it)."""
    monkeypatch.delenv("MEGAWAN_DIST_TIMEOUT_S", raising=False)
    assert run_distributed(_timeout_seen, 2) == [(None, 600.0)] * 2
    monkeypatch.setenv("MEGAWAN_DIST_TIMEOUT_S", "77")
    assert run_distributed(_timeout_seen, 2) == [("77", 77.0)] * 2


def _say_hello():
    print(f"hello from rank {os.environ['RANK']}", flush=True)
    print(f"and to stderr from rank {os.environ['RANK']}", file=sys.stderr, flush=True)


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "spawned"])
def test_what_ranks_print_reaches_the_callers_capture(capfd, fresh):
    """A forked rank writes where the caller's stdout / stderr point now (here pytest's capfd), not where they
    pointed when the fork server started (made sure of: the server starts, or already ran, outside capfd)."""
    with capfd.disabled():
        run_distributed(os.getpid, 1)  # prints nothing
    run_distributed(_say_hello, 2, fresh=fresh)
    out, err = capfd.readouterr()
    assert sorted(line for line in out.splitlines() if line.startswith("hello")) == \
        ["hello from rank 0", "hello from rank 1"], out
    assert sorted(line for line in err.splitlines() if line.startswith("and to")) == \
        ["and to stderr from rank 0", "and to stderr from rank 1"], err


def test_nccl_request_without_enough_gpus_is_a_skip_that_names_the_shortfall(monkeypatch):
    import unittest

    from megawan.testing import test_backend as backend_for

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    monkeypatch.setenv("MEGAWAN_TEST_BACKEND", "nccl")
    with pytest.raises(unittest.SkipTest, match=rf"needs {gpus + 1} GPUs, the machine has {gpus}"):
        backend_for(gpus + 1)
    monkeypatch.setenv("MEGAWAN_TEST_BACKEND", "gloo")
    assert backend_for(gpus + 1) == "gloo"
    monkeypatch.setenv("MEGAWAN_TEST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="MEGAWAN_TEST_BACKEND must be 'gloo' or 'nccl'"):
        backend_for(2)
