"""The main job until the trainer lands: one TI2V flow-matching step, data -> VAE -> DiT, in parallel.

    torchrun --standalone --nproc_per_node 4 -m megawan.tools.forward_demo --data DIR --tp 2 --cp 2

Each data-parallel rank reads a 1X clip, the ranks of a replica encode it with the spatially sharded
VAE38, and the DiT runs forward + backward at the requested TP x CP layout with per-token timesteps
(latent frame 0 clean at t = 0, as TI2V). Rank 0 repeats the same step on a 1-rank layout of the same
weights and prints both losses, the output's relative difference and the gradient's. Weights are
random (seeded; CPU initialisation gives identical full weights for every layout) unless
--dit-checkpoint / --vae-checkpoint point to released ones.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.diffusion import flow_matching_loss, noisy_latents, token_timesteps
from megawan.data.world_model_1x.dataset import WorldModel1XConfig, WorldModel1XDataset
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.vae.model import WanVAE38, WanVAE38Config
from megawan.parallel_state import ParallelGroups
from megawan.parallel_state.grads import reduce_model_parallel_grads


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

    groups = parallel_state.initialize(args.tp, args.cp, vae_shards=args.tp * args.cp)
    rank, dev = dist.get_rank(), groups.device
    data = WorldModel1XDataset(WorldModel1XConfig(root=args.data, clip_frames=args.clip_frames,
                                                  size=(args.size, args.size)))
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

    single = _build_dit(args, ParallelGroups.single_rank(groups.device))
    v1, loss1 = _step(single, latents, noise, args.sigma, text)
    report = {
        "rank": rank, "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp,
                                 "sequence_parallel": dit.sequence_parallel},
        "clip": {"shard": sample["shard"], "first_frame": sample["first_frame"]},
        "video": list(sample["video"].shape), "latents": list(latents.shape),
        "tokens": latents.shape[2] * latents.shape[3] * latents.shape[4] // dit.config.patch_features,
        "loss": loss.item(), "loss_single_rank": loss1.item(),
        "velocity_rel_diff": ((v - v1).norm() / v1.norm()).item(),
        "grad_rel_diff": ((grad - single.patch_embedding.weight.grad).norm()
                          / single.patch_embedding.weight.grad.norm()).item(),
        "seconds": {"vae_encode": round(t_vae, 3), "dit_step": round(t_dit, 3)},
    }
    if rank == 0:
        print(json.dumps(report, indent=2, default=str))
    parallel_state.destroy()
    return report


if __name__ == "__main__":
    main()
