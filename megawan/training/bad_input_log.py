"""A training run's bad input, told once for the whole job by rank 0.

Each rank keeps tallies (``megawan.data.bad_input.BadInputTally``) and prints nothing itself. At each logging
interval every rank hands rank 0 the first notices of the files it found bad since the last interval and the
counts it answers for; rank 0 names each file once (its first notice: path, frame, reason), prints one count
line for the interval, and at the end of the run a summary by kind with the number of distinct files.

Why rank 0 after a gather rather than one rank per replica: the data-parallel replicas read different clips of
the same files (a damaged video is met by several of them), and every rank runs the same construction checks,
so only a view of all ranks names each file once. The gather is one small object collective per logging
interval, at a step every rank reaches, so it costs no extra synchronisation per step.

What each rank answers for, so that nothing is counted twice:
- the clips its loader skipped: counted by the first rank of each replica (tp_rank = cp_rank = 0); the other
  ranks of the replica read the same clips;
- the construction checks and the evaluation reads (``shared`` tally): the same on every rank, counted by rank 0.
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

from megawan.data.bad_input import BadInput, BadInputTally


def _kinds(counts: Counter) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class RunBadInputs:
    def __init__(self, groups, *, shared: BadInputTally, loader: BadInputTally):
        self.groups, self.shared, self.loader = groups, shared, loader
        self.rank = dist.get_rank()
        self.replica_leader = groups.tp_rank == 0 and groups.cp_rank == 0
        # rank 0's view of the job
        self.named: set[str] = set()
        self.files: dict[str, set[str]] = {}
        self.total: Counter[str] = Counter()
        self.since_step = 0

    def _gather(self) -> tuple[list[BadInput], Counter]:
        """Collective: (new notices of every rank, the job's counts since the last gather), on rank 0."""
        new_shared, shared_since = self.shared.take()
        new_loader, loader_since = self.loader.take()
        counted: Counter[str] = Counter()
        if self.rank == 0:
            counted.update(shared_since)
        if self.replica_leader:
            counted.update(loader_since)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (new_shared + new_loader, counted))
        notices = [n for rank_notices, _ in everyone for n in rank_notices]
        return notices, sum((c for _, c in everyone), Counter())

    def lines(self, step: int, *, at_start: bool = False) -> list[str]:
        """Collective (every rank, at the same step): the lines rank 0 prints now (none elsewhere): the first
        notice of each file not named before, then the count since the last call."""
        notices, counts = self._gather()
        if self.rank != 0:
            return []
        out = []
        for n in notices:
            self.files.setdefault(n.kind, set()).add(n.path)
            if n.path not in self.named:
                self.named.add(n.path)
                out.append(f"bad input: {n}")
        self.total.update(counts)
        if counts:
            out.append(f"bad input found by the data's checks at start: {_kinds(counts)}" if at_start else
                       f"step {step}: skipped {_plural(sum(counts.values()), 'bad input')} since step "
                       f"{self.since_step} ({_kinds(counts)})")
        self.since_step = step
        return out

    def summary(self) -> str | None:
        """Rank 0: the run's bad input by kind, with its distinct files (None when there was none)."""
        if not self.total:
            return None
        files = set().union(*self.files.values())
        parts = [f"{kind} {n} in {_plural(len(self.files.get(kind, ())), 'file')}"
                 for kind, n in sorted(self.total.items())]
        return (f"bad input in this run: {sum(self.total.values())} in {_plural(len(files), 'file')} "
                f"({', '.join(parts)}); each file is named once above")
