"""Halo exchange: extend a tile by the rows/columns its convolution window reaches into neighbour tiles.

At the frame border the halo is zeros, which is exactly the zero padding the unsharded convolution uses,
so a padding-free convolution over the extended tile reproduces the unsharded result bit for bit in
exact arithmetic. Rows are exchanged first and columns second, over the row-extended tile: the column
halo then carries the diagonal neighbours' corner pixels, which a 3x3 window needs on a 2-D grid.

All sends and receives of one exchange are posted together with ``batch_isend_irecv`` and then waited on,
so no rank blocks on a peer that is itself blocked (no deadlock whatever the order of ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megawan.vae.partition import SpatialPartition


def _exchange(x: torch.Tensor, part: SpatialPartition, dim: int, before: int, after: int) -> torch.Tensor:
    """Prepend ``before`` slices from the previous tile along ``dim`` and append ``after`` from the next."""
    d_row, d_col = (1, 0) if dim == -2 else (0, 1)
    prev, nxt = part.neighbour(-d_row, -d_col), part.neighbour(d_row, d_col)
    if prev is None and nxt is None:
        pad = [0, 0, 0, 0]
        pad[(0 if dim == -1 else 2)] = before
        pad[(1 if dim == -1 else 3)] = after
        return F.pad(x, pad)

    length = x.shape[dim]
    if length < max(before, after):
        raise ValueError(f"tile of {length} along dim {dim} is thinner than its halo ({before}, {after})")

    def halo_buffer(n: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = n
        return x.new_zeros(shape)

    recv_before, recv_after = halo_buffer(before), halo_buffer(after)
    ops, sent = [], 0
    if prev is not None:
        if before:
            ops.append(dist.P2POp(dist.irecv, recv_before, prev, part.group))
        if after:  # the previous tile needs my first rows as its trailing halo
            send = x.narrow(dim, 0, after).contiguous()
            ops.append(dist.P2POp(dist.isend, send, prev, part.group))
            sent += send.numel() * send.element_size()
    if nxt is not None:
        if after:
            ops.append(dist.P2POp(dist.irecv, recv_after, nxt, part.group))
        if before:  # the next tile needs my last rows as its leading halo
            send = x.narrow(dim, length - before, before).contiguous()
            ops.append(dist.P2POp(dist.isend, send, nxt, part.group))
            sent += send.numel() * send.element_size()
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    if part.stats is not None:
        part.stats.halo_bytes += sent
    return torch.cat([recv_before, x, recv_after], dim=dim)


def pad_with_halo(x: torch.Tensor, part: SpatialPartition, top: int = 1, bottom: int = 1,
                  left: int = 1, right: int = 1) -> torch.Tensor:
    """``x[..., h, w]`` -> ``[..., top + h + bottom, left + w + right]`` with neighbour data or zeros."""
    if top or bottom:
        x = _exchange(x, part, -2, top, bottom)
    if left or right:
        x = _exchange(x, part, -1, left, right)
    return x
