"""Rank functions for the sharded-VAE tests (spawned processes need module-level functions)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.vae.partition import CommStats
from megawan.vae.model import WanVAE38, WanVAE38Config

PIXELS_PER_LATENT = 16


def _band(x: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], scale: int) -> torch.Tensor:
    return x[..., rows[0] * scale:rows[1] * scale, cols[0] * scale:cols[1] * scale].contiguous()


def run_sharded_cases(state: dict, cases: list[dict], data: dict) -> dict:
    """Run every case whose ``ranks`` include this rank; return {case name: results}.

    Each case: ranks (group members, consecutive group ranks in grid order), grid, row_bounds/col_bounds
    (latent units, the tiles the test expects), video/latents keys into ``data``, band_input, gather_output.
    """
    world = int(os.environ["WORLD_SIZE"])
    groups = parallel_state.initialize(1, 1, vae_shards=world, num_heads=None)
    dev = groups.device  # NCCL ranks: the model and its inputs on this rank's GPU
    model = WanVAE38(WanVAE38Config.tiny()).eval()
    model.load_state_dict(state)
    model.to(dev)
    rank = dist.get_rank()
    made = [dist.new_group(case["ranks"]) for case in cases]  # every rank takes part in every new_group
    results = {}
    for case, group in zip(cases, made):
        if rank not in case["ranks"]:
            continue
        if case.get("expect_error"):  # every member must raise (none may wait in a collective)
            idx = case["ranks"].index(rank)
            key = case["per_rank"][idx] if "per_rank" in case else case["video"]
            op = model.decode if case.get("op") == "decode" else model.encode
            try:
                op(data[key].to(dev), group, grid=case.get("grid"), band_input=case.get("band_input", False))
                results[case["name"]] = {"error": None}
            except ValueError as err:
                results[case["name"]] = {"error": str(err)}
            continue
        i, j = divmod(case["ranks"].index(rank), case["grid"][1])
        rows = case["row_bounds"][i], case["row_bounds"][i + 1]
        cols = case["col_bounds"][j], case["col_bounds"][j + 1]
        video, latents = data[case["video"]], data[case["latents"]]
        if case["band_input"]:  # this rank is only ever given its own tile
            video = _band(video, rows, cols, PIXELS_PER_LATENT)
            latents = _band(latents, rows, cols, 1)
        enc_stats, dec_stats = CommStats(), CommStats()
        enc = model.encode(video.to(dev), group, grid=case["grid"], band_input=case["band_input"],
                           gather_output=case["gather_output"], stats=enc_stats)
        dec = model.decode(latents.to(dev), group, grid=case["grid"], band_input=case["band_input"],
                           gather_output=case["gather_output"], stats=dec_stats,
                           frames_per_step=case.get("frames_per_step", 1))
        results[case["name"]] = {"rows": rows, "cols": cols, "encode": enc.cpu(), "decode": dec.cpu(),
                                 "encode_stats": enc_stats, "decode_stats": dec_stats,
                                 "device": str(groups.device)}
    return results


def thin_tile_halo() -> str:
    """Two row tiles of 1 row each asked for a 2-row halo: both ranks must refuse, naming the problem."""
    from megawan.vae.halo import pad_with_halo
    from megawan.vae.partition import SpatialPartition

    groups = parallel_state.initialize(1, 1, vae_shards=2, num_heads=None)
    part = SpatialPartition(groups.vae_group, (2, 1), (0, 1, 2), (0, 3), dist.get_rank(groups.vae_group))
    try:
        pad_with_halo(torch.zeros(1, 4, 1, 1, 3, device=groups.device), part, top=2, bottom=2)
    except ValueError as err:
        return str(err)
    return "no error"
