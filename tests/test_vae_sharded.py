"""VAE38 sharded in space over gloo ranks equals the unsharded VAE (each rank fed only its own tile).

One 4-rank spawn runs every layout: 4 row bands, a 2 x 2 grid with uneven tiles, two concurrent 2-rank
groups (row bands and column bands), 3 uneven row bands, full input with gathered output, and a split
that must be refused.
"""

from __future__ import annotations

import pytest
import torch

from megawan.vae.model import WanVAE38, WanVAE38Config
from megawan.testing import run_distributed
from tests._vae_workers import run_sharded_cases, thin_tile_halo

TOL = 1e-5
PX = 16

CASES = [
    dict(name="n4_rows", ranks=[0, 1, 2, 3], grid=(4, 1), row_bounds=(0, 1, 2, 3, 4), col_bounds=(0, 2),
         video="64x32_t9", band_input=True, gather_output=False),
    dict(name="n4_full_in_gathered_out", ranks=[0, 1, 2, 3], grid=(4, 1), row_bounds=(0, 1, 2, 3, 4),
         col_bounds=(0, 2), video="64x32_t9", band_input=False, gather_output=True),
    dict(name="grid_2x2_uneven", ranks=[0, 1, 2, 3], grid=(2, 2), row_bounds=(0, 2, 3), col_bounds=(0, 2, 3),
         video="48x48_t9_b2", band_input=True, gather_output=False),
    dict(name="n2_rows_uneven_t17", ranks=[0, 1], grid=(2, 1), row_bounds=(0, 2, 3), col_bounds=(0, 2),
         video="48x32_t17", band_input=True, gather_output=False),
    dict(name="n2_cols", ranks=[2, 3], grid=(1, 2), row_bounds=(0, 2), col_bounds=(0, 2, 4),
         video="32x64_t9", band_input=True, gather_output=False),
    dict(name="n3_rows_uneven", ranks=[0, 1, 2], grid=(3, 1), row_bounds=(0, 2, 4, 5), col_bounds=(0, 2),
         video="80x32_t9", band_input=True, gather_output=False),
    dict(name="n2_rows_two_frames_per_step", ranks=[0, 1], grid=(2, 1), row_bounds=(0, 2, 3), col_bounds=(0, 2),
         video="48x32_t17", band_input=True, gather_output=False, frames_per_step=2),
    # documented error paths: every rank of the group must raise the same clear error (nobody hangs)
    dict(name="n4_too_few_rows", ranks=[0, 1, 2, 3], grid=(4, 1), video="48x32_t17", expect_error=True,
         message="cannot split 3 latent rows"),
    dict(name="ranks_disagree_on_frames", ranks=[0, 1], grid=(2, 1), per_rank=["32x32_t9", "32x32_t5"],
         band_input=True, expect_error=True, message="ranks of the VAE group disagree on batch/channels/frames"),
    dict(name="unequal_full_inputs", ranks=[2, 3], grid=(2, 1), per_rank=["64x32_t9", "48x32_t9"],
         band_input=False, expect_error=True, message="band_input=False expects the same full input on every rank"),
    dict(name="tiles_not_a_grid", ranks=[0, 1, 2, 3], grid=(2, 2), op="decode", band_input=True,
         per_rank=["lat_2x2", "lat_1x2", "lat_1x2", "lat_1x2"], expect_error=True,
         message="tiles do not form a grid: rank 1 at tile (0, 1) is 1 x 2 latent"),
]
VIDEOS = {"64x32_t9": (1, 9, 64, 32), "48x48_t9_b2": (2, 9, 48, 48), "48x32_t17": (1, 17, 48, 32),
          "32x64_t9": (1, 9, 32, 64), "80x32_t9": (1, 9, 80, 32), "32x32_t9": (1, 9, 32, 32),
          "32x32_t5": (1, 5, 32, 32), "48x32_t9": (1, 9, 48, 32)}
VIDEOS_SHAPE = {k: (b, 3, t, h, w) for k, (b, t, h, w) in VIDEOS.items()}
ERROR_INPUTS = {"lat_2x2": (1, 48, 2, 2, 2), "lat_1x2": (1, 48, 2, 1, 2)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def sharded_run():
    torch.manual_seed(0)
    model = WanVAE38(WanVAE38Config.tiny()).eval()
    data, reference = {}, {}
    for key, (b, t, h, w) in VIDEOS.items():
        video = torch.rand(b, 3, t, h, w) * 2 - 1
        latents = model.encode(video)
        data[key], data[key + "/latents"] = video, latents
        reference[key] = (latents, model.decode(latents))
    data.update({k: torch.randn(shape) for k, shape in ERROR_INPUTS.items()})
    cases = [dict(c, latents=c["video"] + "/latents") if "video" in c else c for c in CASES]
    per_rank = run_distributed(run_sharded_cases, 4, model.state_dict(), cases, data, timeout_s=300)
    return per_rank, reference


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("expect_error")], ids=lambda c: c["name"])
def test_sharded_equals_unsharded(sharded_run, case):
    per_rank, reference = sharded_run
    latents_ref, video_ref = reference[case["video"]]
    for rank in case["ranks"]:
        got = per_rank[rank][case["name"]]
        (r0, r1), (c0, c1) = got["rows"], got["cols"]
        if case["gather_output"]:
            lat_want, vid_want = latents_ref, video_ref
        else:
            lat_want = latents_ref[..., r0:r1, c0:c1]
            vid_want = video_ref[..., r0 * PX:r1 * PX, c0 * PX:c1 * PX]
        assert got["encode"].shape == lat_want.shape, (rank, got["encode"].shape, lat_want.shape)
        assert got["decode"].shape == vid_want.shape, (rank, got["decode"].shape, vid_want.shape)
        assert rel_err(got["encode"], lat_want) <= TOL, (rank, rel_err(got["encode"], lat_want))
        assert rel_err(got["decode"], vid_want) <= TOL, (rank, rel_err(got["decode"], vid_want))
        for phase in ("encode", "decode"):
            assert got[f"{phase}_stats"].halo_bytes > 0 and got[f"{phase}_stats"].gather_bytes > 0, (rank, phase)
        # every rank's bytes equal the analytic figures (row bands, column bands and the 2-D grid)
        halo, gather = _analytic_encode_bytes(case, rank, VIDEOS_SHAPE[case["video"]])
        assert got["encode_stats"].halo_bytes == halo, (rank, got["encode_stats"].halo_bytes, halo)
        assert got["encode_stats"].gather_bytes == gather, (rank, got["encode_stats"].gather_bytes, gather)
        halo, gather = _analytic_decode_bytes(case, rank, reference[case["video"]][0].shape)
        assert got["decode_stats"].halo_bytes == halo, (rank, got["decode_stats"].halo_bytes, halo)
        assert got["decode_stats"].gather_bytes == gather, (rank, got["decode_stats"].gather_bytes, gather)
        print(f"{case['name']} rank {rank}: encode rel err {rel_err(got['encode'], lat_want):.2e}, "
              f"decode rel err {rel_err(got['decode'], vid_want):.2e}")


def _tile(case, rank):
    """This rank's tile of the grid, in latent units: (ranks, tile rows, tile columns, neighbours above,
    below, left, right (0 or 1 each), rows and columns of the largest tile)."""
    n, (gr, gc) = len(case["ranks"]), case["grid"]
    i, j = divmod(case["ranks"].index(rank), gc)
    rb, cb = case["row_bounds"], case["col_bounds"]
    heights = [b1 - b0 for b0, b1 in zip(rb, rb[1:])]
    widths = [b1 - b0 for b0, b1 in zip(cb, cb[1:])]
    return (n, heights[i], widths[j], int(i > 0), int(i < gr - 1), int(j > 0), int(j < gc - 1),
            max(heights), max(widths))


def _halo(b, channels, frames, rows, cols, top, bottom, left, right):
    """Bytes one 3x3x3 conv sends: 1 row of ``cols`` (per frame, plus 2 causal frames) to each neighbour
    above / below, then 1 column of the row-extended tile (``rows`` + 2: halo or zero rows) to each
    neighbour left / right."""
    return b * channels * (frames + 2) * ((top + bottom) * cols + (left + right) * (rows + 2)) * 4


def _analytic_encode_bytes(case, rank, video_shape) -> tuple[int, int]:
    """Halo bytes this rank sends and bytes it receives through gathers in a sharded encode, from the
    architecture (not the code path).

    Chunks: frame 0 alone, then 4 frames. Every 3x3x3 conv exchanges 1 row of its input with each
    neighbour above and below, the chunk plus 2 causal frames (zeros or cache), then 1 column with each
    neighbour left and right over the row-extended tile (which carries a 2-D grid's corners, and the zero
    rows padded at the frame's edge: each column is 2 rows longer than the tile). A spatial downsample pads
    bottom/right only, so a tile sends 1 row to the tile above it (1 column, over the tile plus its one
    bottom row, to the tile left of it) and none the other way; the 3-D downsamples halve the frames of
    chunks after the first (4 -> 2 -> 1). The mid attention receives K and V (2 x channels) of every other
    tile, padded to the largest, per frame; gather_output adds the latent tiles, padded alike.
    """
    cfg = WanVAE38Config.tiny()
    b, _, t, _, _ = video_shape
    n, tile_h, tile_w, top, bottom, left, right, max_h, max_w = _tile(case, rank)
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    t_lat = (t - 1) // 4 + 1
    halo = 0
    for chunk in [1] + [4] * (t_lat - 1):
        frames, rows, cols = chunk, tile_h * 8, tile_w * 8  # 8 patchified rows / columns per latent one

        def conv3(channels):
            return _halo(b, channels, frames, rows, cols, top, bottom, left, right)

        halo += conv3(cfg.image_channels * 4)  # conv_in
        for s in range(len(cfg.dim_mult)):
            halo += conv3(dims[s]) + (2 * cfg.num_res_blocks - 1) * conv3(dims[s + 1])  # resnets
            if s != len(cfg.dim_mult) - 1:
                halo += b * dims[s + 1] * frames * (top * cols + left * (rows + 1)) * 4  # downsample: one-sided
                rows, cols = rows // 2, cols // 2
                if cfg.temporal_downsample[s] and chunk > 1:
                    frames //= 2
        halo += 4 * conv3(dims[-1]) + conv3(dims[-1])  # mid: 2 resnets x 2 convs; conv_out
    gather = t_lat * b * (n - 1) * max_h * max_w * 2 * dims[-1] * 4
    if case["gather_output"]:
        gather += b * cfg.z_dim * t_lat * max_h * max_w * (n - 1) * 4
    return halo, gather


def _analytic_decode_bytes(case, rank, latent_shape) -> tuple[int, int]:
    """The same for a sharded decode: steps of frame 0 alone, then ``frames_per_step`` latent frames, each
    conv exchanging the step's frames plus 2 causal ones; a spatial upsample exchanges 1 low-resolution row
    (column) with each neighbour after the 3-D upsamples doubled the frames of every step but the first."""
    cfg = WanVAE38Config.tiny()
    b, z, t_lat, _, _ = latent_shape
    n, tile_h, tile_w, top, bottom, left, right, max_h, max_w = _tile(case, rank)
    dims = [cfg.decoder_base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal = (*cfg.temporal_downsample[::-1], False)
    fps = case.get("frames_per_step", 1)
    steps = [1] + [min(fps, t_lat - 1 - k) for k in range(0, t_lat - 1, fps)]
    halo = 0
    for k, step in enumerate(steps):
        frames, rows, cols = step, tile_h, tile_w

        def conv3(channels):
            return _halo(b, channels, frames, rows, cols, top, bottom, left, right)

        halo += conv3(z) + 4 * conv3(dims[0])  # conv_in; mid: 2 resnets x 2 convs
        for s in range(len(cfg.dim_mult)):
            halo += conv3(dims[s]) + (2 * cfg.num_res_blocks + 1) * conv3(dims[s + 1])
            if s != len(cfg.dim_mult) - 1:
                if temporal[s] and k > 0:
                    frames *= 2
                # upsample, at low resolution: 1 row each way, then 1 column of the row-extended tile
                halo += b * dims[s + 1] * frames * ((top + bottom) * cols + (left + right) * (rows + 2)) * 4
                rows, cols = rows * 2, cols * 2
        halo += conv3(dims[-1])  # conv_out
    gather = t_lat * b * (n - 1) * max_h * max_w * 2 * dims[0] * 4
    if case["gather_output"]:
        gather += b * 3 * (4 * (t_lat - 1) + 1) * max_h * max_w * 256 * (n - 1) * 4
    return halo, gather


@pytest.mark.parametrize("case", [c for c in CASES if c.get("expect_error")], ids=lambda c: c["name"])
def test_bad_sharded_inputs_are_refused_on_every_rank(sharded_run, case):
    per_rank, _ = sharded_run
    for rank in case["ranks"]:
        error = per_rank[rank][case["name"]]["error"]
        assert error is not None and case["message"] in error, (rank, error)


def test_tile_thinner_than_its_halo_is_refused():
    for message in run_distributed(thin_tile_halo, 2):
        assert "thinner than its halo" in message, message
