"""Which spatial tile of a video each rank of a VAE process group owns.

The VAE is sharded over an ``rows x cols`` grid of tiles (``cols == 1`` gives horizontal bands). Tile
boundaries are stored in latent units (1 latent row = 16 pixel rows = 8 patchified rows); every layer sees
the same boundaries multiplied by its resolution ``scale`` (8 after patchify, 1 at the latent, 16 in
pixels), so a boundary never falls inside a 2x2 resample window and per-pixel ops stay shard-local.

Group rank ``r`` owns tile ``(r // cols, r % cols)``. Bands may be uneven (e.g. 44 latent rows over 3
ranks -> 15, 15, 14); nothing is ever padded to make them even.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megawan.utils import group_size


@dataclass
class CommStats:
    """Bytes this rank sent for halos and received through K/V and output gathers (for benchmarks)."""

    halo_bytes: int = 0
    gather_bytes: int = 0

    def reset(self) -> None:
        self.halo_bytes = 0
        self.gather_bytes = 0


def _split_evenly(total: int, parts: int, what: str) -> tuple[int, ...]:
    """Boundaries of ``parts`` contiguous pieces of ``total``; the first ``total % parts`` get one more."""
    if total < parts:
        raise ValueError(f"cannot split {total} latent {what} (16 pixels each) over {parts} tiles: "
                         f"every rank needs at least one latent {what[:-1]}")
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return tuple(bounds)


@dataclass(frozen=True)
class SpatialPartition:
    """One rank's view of a tiled frame: grid shape, tile boundaries (latent units) and its neighbours."""

    group: dist.ProcessGroup | None
    grid: tuple[int, int]
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]
    rank: int = 0
    stats: CommStats | None = field(default=None, compare=False)

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def resolve_grid(group, grid: tuple[int, int] | None) -> tuple[int, int]:
        n = group_size(group)
        grid = (n, 1) if grid is None else tuple(grid)
        if len(grid) != 2 or grid[0] * grid[1] != n or min(grid) < 1:
            raise ValueError(f"grid {grid} does not match the {n} ranks of the VAE group "
                             f"(rows * cols must equal the group size)")
        return grid

    @classmethod
    def single(cls, latent_h: int, latent_w: int, stats: CommStats | None = None) -> SpatialPartition:
        """The unsharded case: one tile covering the frame."""
        return cls(None, (1, 1), (0, latent_h), (0, latent_w), 0, stats)

    @classmethod
    def even(cls, group, latent_h: int, latent_w: int, grid=None, stats=None) -> SpatialPartition:
        """Split a ``latent_h x latent_w`` frame as evenly as whole latent rows/cols allow."""
        if group_size(group) == 1:
            return cls.single(latent_h, latent_w, stats)
        grid = cls.resolve_grid(group, grid)
        return cls(group, grid, _split_evenly(latent_h, grid[0], "rows"), _split_evenly(latent_w, grid[1], "cols"),
                   dist.get_rank(group), stats)

    @classmethod
    def from_tile_sizes(cls, group, sizes: list[tuple[int, int]], grid=None, stats=None) -> SpatialPartition:
        """Build the partition from every rank's own tile size (latent units, in group-rank order)."""
        grid = cls.resolve_grid(group, grid)
        rows, cols = grid
        for r, (h, w) in enumerate(sizes):
            i, j = divmod(r, cols)
            if h < 1 or w < 1:
                raise ValueError(f"rank {r} of the VAE group holds an empty tile ({h} x {w} latent)")
            if h != sizes[i * cols][0] or w != sizes[j][1]:
                raise ValueError(f"tiles do not form a grid: rank {r} at tile ({i}, {j}) is {h} x {w} latent, but "
                                 f"its tile row has height {sizes[i * cols][0]} and its tile column width "
                                 f"{sizes[j][1]}")
        row_bounds, col_bounds = [0], [0]
        for i in range(rows):
            row_bounds.append(row_bounds[-1] + sizes[i * cols][0])
        for j in range(cols):
            col_bounds.append(col_bounds[-1] + sizes[j][1])
        return cls(group, grid, tuple(row_bounds), tuple(col_bounds), dist.get_rank(group), stats)

    # ---- geometry -----------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.grid != (1, 1)

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tile_index(self) -> tuple[int, int]:
        return divmod(self.rank, self.grid[1])

    @property
    def full_shape(self) -> tuple[int, int]:
        """Frame size in latent units."""
        return self.row_bounds[-1], self.col_bounds[-1]

    def tile_rows(self, scale: int = 1, tile: tuple[int, int] | None = None) -> tuple[int, int]:
        i = (tile or self.tile_index)[0]
        return self.row_bounds[i] * scale, self.row_bounds[i + 1] * scale

    def tile_cols(self, scale: int = 1, tile: tuple[int, int] | None = None) -> tuple[int, int]:
        j = (tile or self.tile_index)[1]
        return self.col_bounds[j] * scale, self.col_bounds[j + 1] * scale

    def tile_shape(self, scale: int = 1, tile: tuple[int, int] | None = None) -> tuple[int, int]:
        r0, r1 = self.tile_rows(scale, tile)
        c0, c1 = self.tile_cols(scale, tile)
        return r1 - r0, c1 - c0

    def all_tiles(self):
        return [divmod(r, self.grid[1]) for r in range(self.size)]

    def neighbour(self, d_row: int, d_col: int) -> int | None:
        """Global rank of the tile at offset (d_row, d_col), or None at the frame border."""
        i, j = self.tile_index
        i, j = i + d_row, j + d_col
        if not (0 <= i < self.grid[0] and 0 <= j < self.grid[1]):
            return None
        return dist.get_global_rank(self.group, i * self.grid[1] + j)

    # ---- moving whole frames in and out -------------------------------------------------------------
    def take_tile(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """This rank's tile of a full ``[..., H, W]`` tensor at resolution ``scale``."""
        r0, r1 = self.tile_rows(scale)
        c0, c1 = self.tile_cols(scale)
        if not self.sharded:
            return x
        return x[..., r0:r1, c0:c1].contiguous()

    def gather_tiles(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """Assemble every rank's tile ``[..., h, w]`` into the full frame on every rank."""
        if not self.sharded:
            return x
        shapes = [self.tile_shape(scale, t) for t in self.all_tiles()]
        max_h, max_w = max(s[0] for s in shapes), max(s[1] for s in shapes)
        # all_gather needs equal shapes: zero-pad each tile to the largest one, then crop
        padded = x.new_zeros(*x.shape[:-2], max_h, max_w)
        padded[..., : x.shape[-2], : x.shape[-1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        if self.stats is not None:
            self.stats.gather_bytes += padded.numel() * padded.element_size() * (self.size - 1)
        full_h, full_w = self.row_bounds[-1] * scale, self.col_bounds[-1] * scale
        out = x.new_empty(*x.shape[:-2], full_h, full_w)
        for tile, part, (h, w) in zip(self.all_tiles(), parts, shapes):
            r0, _ = self.tile_rows(scale, tile)
            c0, _ = self.tile_cols(scale, tile)
            out[..., r0:r0 + h, c0:c0 + w] = part[..., :h, :w]
        return out
