"""Export of training checkpoints to the released layouts, checked against diffusers' WanTransformer3DModel.

A tiny model (no state conditioning, so diffusers can run it) trains 3 steps at TP2 with an EMA; its
checkpoint is exported on one process (resharded TP2 -> TP1) and on two TP ranks. The reference is the
trainer's own resume of the same checkpoint (megawan code that the export does not use: the optimizer-
aware load) run at TP1; diffusers reads the diffusers-layout exports and must give the same velocity.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megawan.checkpoint.dit_keys import official_keys, to_layout
from megawan.testing import run_distributed
from megawan.tools.export import ExportError, export
from megawan.tools.make_sample_data import make_sample_data
from tests import _export_workers as workers
from tests.dit_fixtures import make_case, rel_err

TOL = 1e-5  # fp32 end to end: only summation order differs (megawan's fused q/k/v, SDPA vs diffusers)


def _argv(data, out, **extra):
    args = {"run.steps": 3, "run.out_dir": out, "parallel.tp": 2, "parallel.cp": 1, "data.root": data,
            "data.clip_frames": 9, "data.size": "[32,32]", "objective.clean_frames": 1, "model.state_dim": 0,
            "optim.warmup_steps": 1, "optim.ema_decay": 0.5, "validation.every": 0, "validation.rollout_every": 0,
            "checkpoint.every": 0,
            "logging.tensorboard": "false", "logging.progress_bar": "false", **extra}
    return [tok for k, v in args.items() for tok in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_sample_data(root / "data", train_shards=2, val_shards=0, frames_per_shard=60, size=32, gop=16,
                            min_segment=20, max_segment=40, captioned_videos=0, workers=1)
    data = str(data / "train_v2.0_raw")
    result = run_distributed(workers.train, 2, _argv(data, str(root / "run")), timeout_s=300)[0]
    ckpt = result["checkpoint"]
    # one process (the CLI): TP2 checkpoint read at TP1
    subprocess.run([sys.executable, "-m", "megawan.tools.export", ckpt, str(root / "diffusers"),
                    "--layout", "diffusers"], check=True, capture_output=True, timeout=300)
    # two TP ranks, as under torchrun
    jobs = [dict(out=root / "diffusers_ema", layout="diffusers", ema=True),
            dict(out=root / "official", layout="official"),
            dict(out=root / "official_bf16", layout="official", dtype="bf16")]
    run_distributed(workers.export, 2, ckpt, jobs, 2, timeout_s=300)
    case = make_case(frames=3, height=4, width=4, per_token=True)
    back = run_distributed(workers.loaded_back, 1, _argv(data, str(root / "run"), **{
        "parallel.tp": 1, "checkpoint.load": ckpt}), case, root / "official", timeout_s=300)[0]
    return {"root": root, "ckpt": ckpt, "case": case, "back": back}


def _diffusers(path, case):
    from diffusers import WanTransformer3DModel

    # from_pretrained needs `accelerate` for this model (fp32-kept modules); the same two steps by hand:
    # its config.json, then every tensor of the folder, strictly (no key missing or left over)
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    model.load_state_dict(load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    model.eval()
    x, t, text = case
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def test_diffusers_runs_the_export_like_megawan_runs_the_checkpoint(run):
    out = _diffusers(run["root"] / "diffusers", run["case"])
    assert rel_err(out, run["back"]["plain"]) <= TOL


def test_ema_export_is_the_ema_and_differs_from_the_weights(run):
    out = _diffusers(run["root"] / "diffusers_ema", run["case"])
    assert rel_err(out, run["back"]["ema_out"]) <= TOL
    assert rel_err(out, run["back"]["plain"]) > 1e-3  # 3 steps with decay 0.5: clearly not the weights
    written = load_file(run["root"] / "diffusers_ema" / "diffusion_pytorch_model.safetensors")
    plain = load_file(run["root"] / "diffusers" / "diffusion_pytorch_model.safetensors")
    for name, t in run["back"]["ema"].items():  # every EMA tensor, bit for bit, in its release keys
        keys = official_keys(name)
        for key, part in zip(keys, t.chunk(len(keys), dim=0)):
            assert torch.equal(written[to_layout(key, "diffusers")], part), key
    assert any(not torch.equal(written[k], plain[k]) for k in plain)


def test_official_export_from_two_tp_ranks_loads_back_into_megawan(run):
    assert rel_err(run["back"]["official"], run["back"]["plain"]) <= TOL


def test_bf16_export_is_the_fp32_export_rounded(run):
    fp32 = load_file(run["root"] / "official" / "diffusion_pytorch_model.safetensors")
    bf16 = load_file(run["root"] / "official_bf16" / "diffusion_pytorch_model.safetensors")
    assert fp32.keys() == bf16.keys()
    for k, t in fp32.items():
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], t.to(torch.bfloat16)), k


@pytest.fixture(scope="module")
def world_model(run, tmp_path_factory):
    """A model with robot-state conditioning (the 1X world model; diffusers cannot run it) and no EMA."""
    root = tmp_path_factory.mktemp("wm")
    data = str(run["root"] / "data" / "train_v2.0_raw")
    argv = _argv(data, str(root / "run"), **{"parallel.tp": 1, "model.state_dim": 25, "optim.ema_decay": 0})
    ckpt = run_distributed(workers.train, 1, argv, timeout_s=300)[0]["checkpoint"]
    subprocess.run([sys.executable, "-m", "megawan.tools.export", ckpt, str(root / "official")], check=True,
                   capture_output=True, timeout=300)
    x, t, text = make_case(frames=3, height=4, width=4, per_token=True)
    states = torch.randn(x.shape[0], 9, 25, generator=torch.Generator().manual_seed(3))  # 4 x (3 - 1) + 1 frames
    back = run_distributed(workers.loaded_back, 1, argv + ["--checkpoint.load", ckpt], (x, t, text, states),
                           root / "official", timeout_s=300)[0]
    return {"ckpt": ckpt, "back": back}


def test_world_model_export_keeps_the_state_embedding(world_model):
    back = world_model["back"]
    assert back["state_weight_norm"] > 0  # trained away from its zero init: the states change the output
    assert rel_err(back["official"], back["plain"]) <= TOL
    assert "ema" not in back


def test_ema_export_of_a_run_without_ema_is_refused(world_model, tmp_path):
    with pytest.raises(ExportError, match="holds no EMA"):
        export(world_model["ckpt"], tmp_path / "o", ema=True)


def test_bad_checkpoint_and_output_folders_are_refused(run, tmp_path):
    ckpt = run["ckpt"]
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(ExportError, match="not a megawan checkpoint folder"):
        export(run["root"] / "data", tmp_path / "o")
    with pytest.raises(ExportError, match="holds checkpoints, it is not one.*step_00000003"):
        export(run["root"] / "run", tmp_path / "o")
    torn = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(ckpt, torn)
    (torn / "megawan_checkpoint.json").unlink()
    with pytest.raises(ExportError, match="incomplete: it has no megawan_checkpoint.json"):
        export(torn, tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="output folder .*full is not empty"):
        export(ckpt, tmp_path / "full")


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megawan.tools.export", str(tmp_path), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert "is not a megawan checkpoint folder" in r.stderr and "Traceback" not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def bf16_run(run, tmp_path_factory):
    """A bf16 run (bf16 weights, fp32 master weights in the distributed optimizer) with an EMA at TP2, its fp32
    and EMA exports, and the trainer's own master weights and EMA gathered from every rank's shards."""
    from tests import _semantics_workers as sw
    from tests import _train_workers as tw

    root = tmp_path_factory.mktemp("bf16")
    data = run["root"] / "data" / "train_v2.0_raw"
    over = tw.tiny_overrides(data, root / "run", **{
        "run.steps": 3, "parallel.tp": 2, "parallel.cp": 1, "model.dtype": "bfloat16", "model.state_dim": 0,
        "data.clip_frames": 9, "data.size": [32, 32], "data.empty_prompt": None, "optim.ema_decay": 0.9,
        "validation.rollout_every": 0})
    reports = run_distributed(sw.train, 2, over, timeout_s=600)
    ckpt = reports[0]["result"]["checkpoint"]
    jobs = [dict(out=root / "fp32", layout="official"), dict(out=root / "ema", layout="official", ema=True)]
    run_distributed(workers.export, 1, ckpt, jobs, 1, timeout_s=300)
    return {"root": root, "reports": reports}


def _by_param(written: dict, name: str) -> torch.Tensor:
    """The exported tensor(s) of one megawan parameter (a fused q/k/v parameter: its three release tensors)."""
    return torch.cat([written[k] for k in official_keys(name)], dim=0)


def test_fp32_export_of_a_bf16_run_holds_the_master_weights(bf16_run):
    written = load_file(bf16_run["root"] / "fp32" / "diffusion_pytorch_model.safetensors")
    for report in bf16_run["reports"]:  # both TP ranks gathered the same master weights
        master, weights = report["master"], report["weights"]
        rounded = 0
        for name, m in master.items():
            t = _by_param(written, name)
            assert t.dtype == torch.float32 and torch.equal(t, m), name
            rounded += int(not torch.equal(t, weights[name]))
        # the bf16 GEMM weights are the master weights rounded: the export is not those
        assert rounded > 0 and any(not torch.equal(m, m.bfloat16().float()) for m in master.values())


def test_ema_export_holds_the_ema_of_the_master_weights(bf16_run):
    written = load_file(bf16_run["root"] / "ema" / "diffusion_pytorch_model.safetensors")
    for report in bf16_run["reports"]:
        for name, e in report["ema"].items():
            assert torch.equal(_by_param(written, name), e), name
        assert any(not torch.equal(report["ema"][n], report["master"][n]) for n in report["ema"])
