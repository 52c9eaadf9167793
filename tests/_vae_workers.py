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
    model = WanVAE38(WanVAE38Config.tiny()).eval()
    model.load_state_dict(state)
    rank = dist.get_rank()
    made = [dist.new_group(case["ranks"]) for case in cases]  # every rank takes part in every new_group
    results = {}
    for case, group in zip(cases, made):
        if rank not in case["ranks"]:
            continue
        if case.get("expect_error"):
            try:
                model.encode(data[case["video"]], group, grid=case.get("grid"))
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
        stats = CommStats()
        enc = model.encode(video, group, grid=case["grid"], band_input=case["band_input"],
                           gather_output=case["gather_output"], stats=stats)
        dec = model.decode(latents, group, grid=case["grid"], band_input=case["band_input"],
                           gather_output=case["gather_output"], stats=stats)
        results[case["name"]] = {"rows": rows, "cols": cols, "encode": enc, "decode": dec,
                                 "halo_bytes": stats.halo_bytes, "gather_bytes": stats.gather_bytes,
                                 "device": str(groups.device)}
    return results
