"""Loader workers and the parent's decoders: with every CPU backend forced explicitly and the parent having
read clips first (as a trainer does for validation or a first batch), forked workers return the same clips
as a single-process read, skip nothing, do not hang, and never touch a reader the parent opened."""

import os

import pytest
import torch

from megawan.data import ClipLoader, DistributedClipSampler, WorldModel1XConfig, WorldModel1XDataset
from megawan.tools.make_sample_data import make_sample_data
from tests._decoders import CPU_BACKENDS, require_backend


class _TracedDataset(WorldModel1XDataset):
    """Adds which process read each clip and which reader object it used."""

    def load_clip(self, clip):
        sample = super().load_clip(clip)
        position, _ = self.index.locate(clip)
        sample["pid"], sample["reader_id"] = os.getpid(), id(self._readers[position])
        return sample


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_sample_data(tmp_path_factory.mktemp("w"), train_shards=2, val_shards=0, frames_per_shard=64,
                            size=64, gop=8, min_segment=20, max_segment=40, captioned_videos=0, workers=2)
    return root / "train_v2.0_raw"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_workers_after_the_parent_read_clips(split, backend, num_workers):
    require_backend(backend)
    ds = _TracedDataset(WorldModel1XConfig(str(split), clip_frames=5, window_hop=3, backend=backend))
    assert ds.backend == backend and dict(ds.report.counts) == {}
    # Single-process reference, which also leaves readers of every shard open in the parent.
    reference = {}
    for clip in range(len(ds)):
        s = ds[clip]
        reference[(s["shard"], s["first_frame"])] = s["video"]
    parent_readers = {id(r) for r in ds._readers.values()}
    assert len(parent_readers) == len(ds.shards)

    sampler = DistributedClipSampler(len(ds), dp_rank=0, dp_size=1, seed=0)
    loader = ClipLoader(ds, sampler, batch_size=4, num_workers=num_workers, timeout_s=60)
    seen = []
    for _ in range(2):  # two epochs: the persistent workers keep their own readers open
        for batch in loader:
            for k, key in enumerate(zip(batch["shard"].tolist(), batch["first_frame"].tolist())):
                assert torch.equal(batch["video"][k], reference[key]), key
                seen.append(key)
            pids, readers = set(batch["pid"].tolist()), set(batch["reader_id"].tolist())
            if num_workers:
                assert os.getpid() not in pids and not readers & parent_readers
            else:
                assert pids == {os.getpid()} and readers <= parent_readers
    assert sorted(seen) == sorted(list(reference) * 2)
    assert sum(loader.skip_counts.values()) == 0, dict(loader.skip_counts)
