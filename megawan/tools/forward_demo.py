"""The main job until the trainer lands: one TI2V flow-matching step, data -> VAE -> DiT, in parallel.

    torchrun --standalone --nproc_per_node 4 -m megawan.tools.forward_demo --data DIR --tp 2 --cp 2

Each data-parallel rank reads a 1X clip, the ranks of a replica encode it with the spatially sharded
VAE38, and the DiT runs forward + backward at the requested TP x CP layout with per-token timesteps
(latent frame 0 clean at t = 0, as TI2V). Rank 0 repeats the same step on a 1-rank layout of the same
weights; rank 0 prints the report (losses, the output's relative difference, the gradients' of a replicated
and of a TP-split parameter, worst over all ranks, and the bad input the reader skipped) and ends with one
verdict line, PASS or FAIL and why (exit status 1 on FAIL). A startup error (a layout that breaks a rule, a
missing data folder) is printed once, by rank 0, and the job exits with status 3. Weights are
random (seeded; CPU initialisation gives identical full weights for every layout) unless
--dit-checkpoint / --vae-checkpoint point to released ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.diffusion import flow_matching_loss, noisy_latents, token_timesteps
from megawan.data.world_model_1x.dataset import WorldModel1XConfig, WorldModel1XDataset
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.vae.model import WanVAE38, WanVAE38Config
from megawan.parallel_state import LayoutError, ParallelGroups
from megawan.parallel_state.launch import startup_error
from megawan.parallel_state.grads import reduce_model_parallel_grads


TOLERANCE = 1e-4  # relative, float32 on CPU: only the order of reductions differs from the single rank
def _tp_split_grad(model: WanDiT, groups: ParallelGroups) -> tuple[str, torch.Tensor]:
    """Name and full gradient of the first TP-split (stride 1) parameter, gathered over the TP group."""
    name, p = next((n, p) for n, p in model.named_parameters()
                   if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_stride", 1) == 1)
    parts = [torch.empty_like(p.grad) for _ in range(groups.tp)]
    dist.all_gather(parts, p.grad.contiguous(), group=groups.tp_group)
    return name, torch.cat(parts, dim=p.partition_dim)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _verdict(reports: list[dict], layout: dict) -> str:
    """One line for the whole job: the worst relative difference of every rank against its single-rank run."""
    worst = {key: max(r[key] for r in reports) for key in ("loss_rel_diff", "velocity_rel_diff", "grad_rel_diff",
                                                           "grad_tp_split_rel_diff")}
    shown = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    what = f"TP{layout['tp']} x CP{layout['cp']} x DP{layout['dp']} step vs the single-rank run"
    bad = [k for k, v in worst.items() if not v <= TOLERANCE]
    if bad:
        return f"FAIL: {what}: {', '.join(bad)} above the tolerance {TOLERANCE:.0e} ({shown})"
    return f"PASS: {what} agree within {TOLERANCE:.0e} ({shown})"


def _build_dit(args, groups) -> WanDiT:
    rt = DiTRuntime(sequence_parallel=not args.no_sp, linear_impl="local" if groups.device.type == "cpu" else "auto")
    if args.dit_checkpoint:
        return WanDiT.from_pretrained(args.dit_checkpoint, groups=groups, runtime=rt)
    torch.manual_seed(args.seed)
    return WanDiT(WanDiTConfig.load(args.dit_config), groups, rt)


def _step(model: WanDiT, latents, noise, sigma: float, text):
    """Flow matching for TI2V (megawan.diffusion): frame 0 clean at t = 0, v = noise - x0, loss on frames 1..."""
    b, _, f, h, w = latents.shape
    pt, ph, pw = model.config.patch_size
    sigmas = torch.full((b,), sigma)
    clean = torch.ones(b, dtype=torch.int64)
    x_t = noisy_latents(latents, noise, sigmas, clean)
    t = token_timesteps(sigmas, clean, (f // pt, h // ph, w // pw)).to(latents.device)
    v = model(x_t, t, text)
    loss = flow_matching_loss(v, latents, noise, clean)
    loss.backward()
    return v.detach(), loss.detach()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a 1X split folder (e.g. from megawan.tools.make_sample_data)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--no-sp", action="store_true", help="disable sequence parallelism")
    p.add_argument("--clip-frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="square frame size fed to the VAE")
    p.add_argument("--dit-config", default="tiny")
    p.add_argument("--dit-checkpoint")
    p.add_argument("--vae-checkpoint")
    p.add_argument("--sigma", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    env_rank = parallel_state.launch_env()["rank"]
    if env_rank != 0:  # every rank reads the same files: rank 0 alone names each bad one
        logging.getLogger("megawan.data").setLevel(logging.ERROR)
    try:
        groups = parallel_state.initialize(args.tp, args.cp, vae_shards=args.tp * args.cp)
    except LayoutError as e:
        startup_error(e, env_rank)
    rank, dev = dist.get_rank(), groups.device
    try:
        data = WorldModel1XDataset(WorldModel1XConfig(root=args.data, clip_frames=args.clip_frames,
                                                      size=(args.size, args.size)))
    except (FileNotFoundError, ValueError) as e:  # no data there, or no clip fits
        parallel_state.destroy()
        startup_error(e, rank)
    sample = data[groups.dp_rank % len(data)]
    torch.manual_seed(args.seed)
    vae = (WanVAE38.from_pretrained(args.vae_checkpoint, device=dev) if args.vae_checkpoint
           else WanVAE38(WanVAE38Config.preset("tiny")).to(dev))
    t0 = time.perf_counter()
    latents = vae.encode(sample["video"][None].to(dev), groups.vae_group, gather_output=True)
    t_vae = time.perf_counter() - t0

    dit = _build_dit(args, groups)
    gen = torch.Generator().manual_seed(args.seed + groups.dp_rank)
    noise = torch.randn(latents.shape, generator=gen).to(dev)
    text = torch.zeros(1, dit.config.text_len, dit.config.text_dim, device=dev)  # empty-prompt stand-in
    t0 = time.perf_counter()
    v, loss = _step(dit, latents, noise, args.sigma, text)
    reduce_model_parallel_grads(dit, groups)
    t_dit = time.perf_counter() - t0
    grad = dit.patch_embedding.weight.grad.clone()  # replicated: complete after the reductions
    split_name, split_grad = _tp_split_grad(dit, groups)

    single = _build_dit(args, ParallelGroups.single_rank(groups.device))
    v1, loss1 = _step(single, latents, noise, args.sigma, text)
    report = {
        "rank": rank, "dp_rank": groups.dp_rank, "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp,
                                 "sequence_parallel": dit.sequence_parallel},
        "clip": {"shard": sample["shard"], "first_frame": sample["first_frame"]},
        "video": list(sample["video"].shape), "latents": list(latents.shape),
        "tokens": latents.shape[2] * latents.shape[3] * latents.shape[4] // dit.config.patch_features,
        "loss": loss.item(), "loss_single_rank": loss1.item(),
        "loss_rel_diff": abs(loss.item() - loss1.item()) / abs(loss1.item()),
        "velocity_rel_diff": _rel(v, v1),
        "grad_rel_diff": _rel(grad, single.patch_embedding.weight.grad),  # replicated parameter
        "grad_tp_split": split_name,
        "grad_tp_split_rel_diff": _rel(split_grad, dict(single.named_parameters())[split_name].grad),
        "bad_input_skipped": dict(data.report.counts),  # construction checks + clips replaced on this rank
        "seconds": {"vae_encode": round(t_vae, 3), "dit_step": round(t_dit, 3)},
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, report)
    report["verdict"] = _verdict(everyone, report["layout"])
    # what each replica's reader skipped (ranks of one replica read the same clip: one entry per DP rank)
    report["bad_input_skipped_by_dp_rank"] = {r["dp_rank"]: r["bad_input_skipped"] for r in everyone}
    if rank == 0:
        print(json.dumps({k: v for k, v in report.items() if k != "verdict"}, indent=2, default=str))
        print(report["verdict"], flush=True)
    parallel_state.destroy()
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["verdict"].startswith("PASS") else 1)
