"""A DataLoader wrapper that knows how far the epoch got (for checkpoints) and what was skipped.

Decoding runs in loader workers; ``timeout_s`` turns a hung worker into an error instead of a hung job
(a worker that dies is reported by the DataLoader itself). Bad-input counts from the dataset's own checks
and from the workers (their notices travel inside batches) add up in ``skip_counts``; the notices of the
batches handed out are kept in ``tally`` and, when the dataset's report announces, each file is named once
here, in the main process, however many workers met it.

GPU decoding (PyNvVideoCodec): each rank decodes on its own GPU, ``decode_device`` (default: this
process's current CUDA device, which ``parallel_state.initialize`` sets to the rank's): the workers are
spawned (CUDA cannot be used after fork) and each sets that device first, since a fresh process would
otherwise decode on cuda:0. What leaves a worker is on the CPU: CUDA tensors are copied to the CPU before
the batch crosses the process boundary (the DataLoader cannot keep a worker's CUDA memory alive for the
trainer); the trainer moves the batch to its device.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.utils.data

from megawan.data.bad_input import BadInput, BadInputTally, count_by_kind
from megawan.data.sampler import DistributedClipSampler


def _decode_on(device: torch.device, worker_id: int) -> None:
    """A loader worker's first act: decode on this rank's GPU, not on cuda:0."""
    torch.cuda.set_device(device)


def collate_samples(samples: list[dict]) -> dict:
    """Stack tensors, turn ints into int64 tensors, keep strings as lists, join the skipped inputs' notices.

    In a loader worker, CUDA tensors (GPU-decoded frames) are moved to the CPU: only CPU tensors cross
    the worker boundary."""
    if torch.utils.data.get_worker_info() is not None:
        samples = [{k: v.cpu() if isinstance(v, torch.Tensor) and v.is_cuda else v for k, v in s.items()}
                   for s in samples]
    batch: dict = {"num_samples": len(samples), "skipped": [n for s in samples for n in s.get("skipped", ())]}
    for key in samples[0]:
        if key == "skipped":
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class ClipLoader:
    """Iterate one epoch per ``for`` loop; ``state_dict`` / ``load_state_dict`` resume mid-epoch.

    The resume point counts samples handed to the caller, not samples the workers have prefetched, so
    restoring a checkpoint replays exactly the samples after the last batch the trainer saw.
    """

    def __init__(self, dataset, sampler: DistributedClipSampler, *, batch_size: int, num_workers: int = 0,
                 timeout_s: float = 300.0, prefetch_factor: int | None = 2, pin_memory: bool = False,
                 multiprocessing_context: str | None = None, decode_device: torch.device | None = None):
        self.dataset, self.sampler, self.timeout_s = dataset, sampler, timeout_s
        worker_init = None
        if getattr(dataset, "backend", None) == "pynvvideocodec":
            multiprocessing_context = multiprocessing_context or "spawn"  # no CUDA in forked workers
            self.decode_device = torch.device(decode_device or torch.device("cuda", torch.cuda.current_device()))
            if self.decode_device.type != "cuda" or self.decode_device.index is None:
                raise ValueError(f"GPU decoding needs a CUDA device with an index, got {self.decode_device}")
            worker_init = functools.partial(_decode_on, self.decode_device)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
            collate_fn=collate_samples, pin_memory=pin_memory, drop_last=False,
            timeout=timeout_s if num_workers > 0 else 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            worker_init_fn=worker_init if num_workers > 0 else None,
        )
        self.report = getattr(dataset, "report", None)
        self.skip_counts: Counter[str] = Counter(getattr(self.report, "counts", {}))
        self.tally = BadInputTally()  # what the batches handed out skipped (not the construction checks)
        self._position = sampler.offset

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.loader.batch_size)

    def __iter__(self):
        self._position = self.sampler.offset
        finished = False
        try:
            for batch in self._batches():
                self._position += batch["num_samples"]
                self._count_skipped(batch.pop("skipped"))
                yield batch
            finished = True
        finally:
            if finished:
                self.sampler.set_epoch(self.sampler.epoch + 1)
            else:  # the caller stopped early: the next loop continues where it stopped
                self.sampler.offset = self._position
            self._position = self.sampler.offset

    def _count_skipped(self, notices: list[BadInput]) -> None:
        self.skip_counts.update(count_by_kind(notices))
        for notice in notices:
            self.tally.add(notice)
            if self.report is not None:
                self.report.name_once(notice)  # once per file (a report that does not announce: never)

    def _batches(self):
        try:
            yield from self.loader
        except RuntimeError as e:
            if "timed out" in str(e):
                raise RuntimeError(f"data loader: no batch within {self.timeout_s}s from "
                                   f"{self.loader.num_workers} workers (a decoder hung or a file blocks)") from e
            raise

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self._position)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._position = self.sampler.offset
