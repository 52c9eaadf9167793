"""launch/run.sh and launch/train.sh: the resolved torchrun command, and bad arguments refused before anything runs;
the memory arithmetic in the H100 run configs' headers.

A stand-in ``torchrun`` first on PATH records its arguments instead of starting ranks, so these tests see
exactly what would have been launched (or that nothing was). The real launch runs in tests/test_slurm.py.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megawan.training import trainer
from megawan.training.config import load_config, preset_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def launch(tmp_path):
    """``launch(script, *args)`` -> (CompletedProcess, torchrun's argv or None when it was not started)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "torchrun.args"
    stub = bin_dir / "torchrun"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGAWAN_PYTHON": sys.executable}

    def run(script: str, *args: str):
        out = subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        started = record.read_text().splitlines() if record.exists() else None
        record.unlink(missing_ok=True)
        return out, started

    return run


def test_train_resolves_layout_and_overrides_into_one_torchrun(launch):
    out, argv = launch("train.sh", "--nproc", "4", "--tp", "2", "--cp", "2", "--config", "tiny_1x",
                       "--run.steps", "30", "--optim.lr=0.001")
    assert out.returncode == 0, out.stderr
    assert argv == ["--standalone", "--nproc_per_node", "4", "-m", "megawan.train", "--config", "tiny_1x",
                    "--run.steps", "30", "--optim.lr=0.001", "--parallel.tp", "2", "--parallel.cp", "2"]
    assert "train on 1 node(s) x 4 rank(s), tp=2 cp=2 dp=1" in out.stdout
    assert "+ 'bash' 'launch/torchrun.sh' '4' 'megawan.train'" in out.stdout  # printed before it runs


def test_multi_node_without_slurm_passes_the_rendezvous(launch):
    out, argv = launch("run.sh", "train", "--nodes", "2", "--gpus-per-node", "2", "--node-rank", "1",
                       "--master-addr", "10.1.2.3", "--master-port", "29511", "--tp", "2", "--cp", "2")
    assert out.returncode == 0, out.stderr
    assert argv[:10] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.1.2.3", "--master_port",
                         "29511", "--nproc_per_node", "2"]
    assert "tp=2 cp=2 dp=1" in out.stdout  # 2 nodes x 2 ranks


@pytest.mark.parametrize("args,module_args", [
    (["module", "megawan.tools.forward_demo", "--nproc", "4", "--tp", "2", "--cp", "2", "--", "--data", "D"],
     ["-m", "megawan.tools.forward_demo", "--data", "D", "--tp", "2", "--cp", "2"]),
    (["generate", "--nproc", "2", "--cp", "2", "--", "--prompt", "a robot", "--steps", "4"],
     ["-m", "megawan.generate", "--prompt", "a robot", "--steps", "4", "--cp", "2"]),
    (["precompute", "--nproc", "2", "--", "--vae-shards", "2"], ["-m", "megawan.tools.precompute", "--vae-shards", "2"]),
])
def test_other_commands_pass_module_arguments_through(launch, args, module_args):
    out, argv = launch("run.sh", *args)
    assert out.returncode == 0, out.stderr
    assert argv[3:] == module_args


def test_dry_run_prints_and_starts_nothing(launch):
    out, argv = launch("train.sh", "--nproc", "4", "--dry-run")
    assert out.returncode == 0 and argv is None
    assert "'megawan.train' '--config' 'tiny_1x'" in out.stdout


@pytest.mark.parametrize("script,args,message", [
    ("train.sh", ["--nproc", "4", "--bogus", "1"], "unknown option '--bogus'"),
    ("train.sh", ["--nproc", "3", "--tp", "2", "--cp", "1"], "parallel.tp * parallel.cp = 2 * 1 = 2 does not divide the 3 ranks"),
    ("train.sh", ["--nproc", "2"], "parallel.tp * parallel.cp = 2 * 2 = 4 does not divide the 2 ranks"),
    ("train.sh", ["--nproc", "4", "--config", "no_such.yaml"], "'no_such.yaml' is neither a file nor a preset"),
    ("train.sh", ["--nproc", "4", "--optim.lrr", "1"], "unknown config key optim.lrr"),
    ("train.sh", ["--nproc", "0"], "--nproc needs a positive integer"),
    ("train.sh", ["--nodes", "2", "--nproc", "2"], "needs --node-rank"),
    ("train.sh", ["--nodes", "2", "--nproc", "2", "--node-rank", "2", "--master-addr", "h"],
     "--node-rank 2 is not below --nodes 2"),
    ("run.sh", ["generate", "--nproc", "4", "--tp", "3"], "tp * cp = 3 * 1 = 3 does not divide the 4 ranks"),
    ("run.sh", ["generate", "--ckpt", "x"], "unknown option '--ckpt' (module arguments go after --)"),
    ("run.sh", ["evaluate", "--config", "x"], "--config is for train"),
    ("run.sh", ["precompute", "--tp", "2"], "precompute has no tp / cp"),
    ("run.sh", ["module", "megawan.no_such_tool"], "python module megawan.no_such_tool is not in this checkout"),
    ("run.sh", ["frobnicate"], "unknown COMMAND 'frobnicate'"),
    ("run.sh", [], "missing COMMAND"),
])
def test_bad_arguments_give_usage_and_start_nothing(launch, script, args, message):
    out, argv = launch(script, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "usage: bash launch/run.sh COMMAND" in out.stderr
    assert argv is None and out.stdout == ""


@pytest.mark.parametrize("preset,world,size", [("ti2v5b_1x", 8, [512, 512]), ("ti2v5b_1x_4x8", 32, [512, 512]),
                                               ("ti2v5b_720p", 8, [704, 1280])])
def test_the_h100_configs_fit_80gb_as_their_headers_say(preset, world, size, monkeypatch, caplog):
    """The memory arithmetic written in a run config's header is the trainer's own estimate for that layout."""
    # the preset's model and clip shape, without the released files or the latent cache
    cfg = load_config(preset, {"model": {"init": None, "dit": "wan2.2-ti2v-5b"},
                               "data": {"source": "1x", "size": size}})
    monkeypatch.setattr(trainer, "device_capacity_bytes", lambda device: 80e9)
    with caplog.at_level(logging.INFO, logger=trainer.logger.name):
        trainer.check_memory(cfg, trainer.model_config(cfg), world, torch.device("cpu"))  # raises if it does not fit
    estimate = re.search(r"memory estimate per rank: ([\d.]+) GiB", caplog.text)
    header = re.search(r"(?:^#\s+|\) )= ([\d.]+) GiB", preset_path(preset).read_text(), re.M)
    assert estimate and header and estimate.group(1) == header.group(1), (caplog.text, header)
    assert float(header.group(1)) < 80e9 / 2**30
