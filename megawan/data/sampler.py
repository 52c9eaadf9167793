"""Deterministic, data-parallel, resumable order over a dataset's items.

Each epoch's order is a permutation drawn from (seed, epoch) alone, so every rank computes the same one
without communication. Data-parallel rank r takes positions r, r + dp, r + 2 dp, ... of it: the first
k * dp positions are exactly what all ranks consumed after k samples each, which makes the resume point a
single number that stays valid when the job restarts with a different dp size. TP / CP ranks of one DP
rank pass the same ``dp_rank`` and so read the same items.
"""

from __future__ import annotations

import numpy as np
import torch.utils.data


class DistributedClipSampler(torch.utils.data.Sampler[int]):
    """Yields this DP rank's item numbers for the current epoch, from the resume point on.

    Without ``drop_last`` the epoch is padded with its first items to a multiple of ``dp_size`` so every
    rank gets the same count (ranks must step together) and every item is seen; with it the tail is dropped.
    """

    def __init__(self, num_items: int, *, dp_rank: int, dp_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if num_items <= 0:
            raise ValueError("the dataset has no items")
        if drop_last and num_items < dp_size:
            raise ValueError(f"{num_items} items cannot feed {dp_size} data-parallel ranks with drop_last")
        self.num_items, self.dp_rank, self.dp_size = num_items, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.offset = 0  # this rank's items of the current epoch already consumed

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's item order (all ranks), padded or cut to a multiple of dp_size."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        if self.drop_last:
            return order[: self.num_items - self.num_items % self.dp_size]
        pad = -self.num_items % self.dp_size
        return np.concatenate([order, np.resize(order, pad)]) if pad else order

    @property
    def items_per_rank(self) -> int:
        if self.drop_last:
            return self.num_items // self.dp_size
        return -(-self.num_items // self.dp_size)

    def __iter__(self):
        mine = self.epoch_order(self.epoch)[self.dp_rank:: self.dp_size]
        return iter(mine[self.offset:].tolist())

    def __len__(self) -> int:
        return self.items_per_rank - self.offset

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        """Resume point; ``consumed`` = this rank's items of the epoch consumed so far (default: offset)."""
        consumed = self.offset if consumed is None else consumed
        return {"epoch": self.epoch, "consumed_global": consumed * self.dp_size, "seed": self.seed,
                "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_items']} items / seed {state['seed']}, "
                             f"this sampler has {self.num_items} / {self.seed}")
        self.epoch = int(state["epoch"])
        self.offset = int(state["consumed_global"]) // self.dp_size
        if self.offset >= self.items_per_rank:  # the saved epoch was finished
            self.set_epoch(self.epoch + 1)
