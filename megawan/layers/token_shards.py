"""How the video tokens of one sample are laid out over the TP x CP ranks of a model replica.

The token sequence (frame, row, col raster order) is padded at its end so the shards divide it,
split into ``cp`` contiguous chunks (one per CP rank: attention is bidirectional, so no zig-zag
is needed), and, with sequence parallelism, each chunk into ``tp`` contiguous pieces: the residual
stream of rank (cp_rank, tp_rank) holds piece ``cp_rank * tp + tp_rank``. Padded tokens sit at the
end of the global sequence, so attention drops them by truncating keys/values to ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megawan.layers.comm import gather_dim0, slice_dim0


@dataclass(frozen=True)
class TokenShards:
    num_tokens: int
    tp: int
    cp: int
    tp_rank: int
    cp_rank: int
    sequence_parallel: bool
    tp_group: object = None
    cp_group: object = None

    @property
    def sp_size(self) -> int:
        return self.tp if self.sequence_parallel else 1

    @property
    def padded_tokens(self) -> int:
        unit = self.cp * self.sp_size
        return -(-self.num_tokens // unit) * unit

    @property
    def num_padding(self) -> int:
        return self.padded_tokens - self.num_tokens

    @property
    def cp_chunk(self) -> tuple[int, int]:
        """[start, end) of the tokens this CP rank attends from (the TP region's sequence)."""
        size = self.padded_tokens // self.cp
        return self.cp_rank * size, (self.cp_rank + 1) * size

    @property
    def local_range(self) -> tuple[int, int]:
        """[start, end) of the residual-stream tokens held by this rank."""
        start, end = self.cp_chunk
        size = (end - start) // self.sp_size
        sp_rank = self.tp_rank if self.sequence_parallel else 0
        return start + sp_rank * size, start + (sp_rank + 1) * size

    def pad(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Zero-pad ``x`` along ``dim`` from num_tokens to padded_tokens."""
        if self.num_padding == 0:
            return x
        shape = list(x.shape)
        shape[dim] = self.num_padding
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Full padded [S, ...] (same on every rank) -> this rank's residual tokens.

        Backward all-gathers, so the input's gradient is complete on every rank.
        """
        x = slice_dim0(x, self.cp_group if self.cp > 1 else None)
        return slice_dim0(x, self.tp_group if self.sp_size > 1 else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's residual tokens -> the full padded sequence on every rank (backward: slice)."""
        x = gather_dim0(x, self.tp_group if self.sp_size > 1 else None)
        return gather_dim0(x, self.cp_group if self.cp > 1 else None)
