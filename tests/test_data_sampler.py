"""Sampler and loader: deterministic order, DP split (no overlap, full coverage), mid-epoch resumption."""

import numpy as np
import pytest
import torch

from megawan.data import ClipLoader, DistributedClipSampler, WorldModel1XConfig, WorldModel1XDataset
from megawan.testing import run_distributed
from megawan.tools.make_sample_data import make_sample_data


def rank_items(n, dp, epoch=0, **kw):
    out = []
    for r in range(dp):
        s = DistributedClipSampler(n, dp_rank=r, dp_size=dp, seed=3, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,dp", [(100, 4), (103, 4), (7, 3), (50, 1)])
def test_dp_split_covers_everything_once(n, dp):
    per_rank = rank_items(n, dp)
    assert len({len(x) for x in per_rank}) == 1  # ranks step together
    flat = [i for x in per_rank for i in x]
    assert set(flat) == set(range(n))  # full coverage
    assert len(flat) - len(set(flat)) == (-n) % dp  # overlap only in the padding
    dropped = rank_items(n, dp, drop_last=True)
    flat = [i for x in dropped for i in x]
    assert len(flat) == len(set(flat)) == n - n % dp  # no overlap at all


def test_order_depends_only_on_seed_and_epoch():
    a, b = rank_items(64, 2, epoch=1), rank_items(64, 2, epoch=1)
    assert a == b
    assert rank_items(64, 2, epoch=2) != a
    assert sorted(sum(a, [])) == list(range(64))


def test_resume_with_another_dp_size_continues_the_global_order():
    n = 96
    order = DistributedClipSampler(n, dp_rank=0, dp_size=1, seed=5).epoch_order(0).tolist()
    s4 = DistributedClipSampler(n, dp_rank=0, dp_size=4, seed=5)
    state = s4.state_dict(consumed=6)  # 6 items on each of 4 ranks = first 24 of the epoch
    rest = []
    for r in range(2):
        s2 = DistributedClipSampler(n, dp_rank=r, dp_size=2, seed=5)
        s2.load_state_dict(state)
        rest.append(list(s2))
    assert sorted(sum(rest, [])) == sorted(order[24:])


def _tp_cp_ranks_read_the_same_items():
    from megawan import parallel_state

    groups = parallel_state.initialize(tp=2, cp=1, num_heads=None)
    sampler = DistributedClipSampler(30, dp_rank=groups.dp_rank, dp_size=groups.dp, seed=1)
    return groups.dp_rank, groups.tp_rank, list(sampler)


def test_every_tp_rank_of_a_dp_rank_gets_the_same_clips():
    results = run_distributed(_tp_cp_ranks_read_the_same_items, 4, timeout_s=240)
    by_dp = {}
    for dp_rank, _, items in results:
        by_dp.setdefault(dp_rank, []).append(items)
    assert sorted(by_dp) == [0, 1]
    for items in by_dp.values():
        assert items[0] == items[1]  # both TP ranks
    assert not set(by_dp[0][0]) & set(by_dp[1][0])
    assert set(by_dp[0][0]) | set(by_dp[1][0]) == set(range(30))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_sample_data(tmp_path_factory.mktemp("s"), train_shards=2, val_shards=0, frames_per_shard=90,
                            size=32, gop=16, min_segment=20, max_segment=50, captioned_videos=0, workers=2)
    return WorldModel1XDataset(WorldModel1XConfig(str(root / "train_v2.0_raw"), clip_frames=5, window_hop=3))


def ids(batch):
    return list(zip(batch["shard"].tolist(), batch["first_frame"].tolist()))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_with_the_same_sequence(dataset, num_workers):
    def make():
        sampler = DistributedClipSampler(len(dataset), dp_rank=1, dp_size=2, seed=11)
        return ClipLoader(dataset, sampler, batch_size=3, num_workers=num_workers, timeout_s=60)

    reference = make()
    epoch0 = [ids(b) for b in reference]
    epoch1 = [ids(b) for b in reference]  # the loop advances the epoch
    assert epoch0 != epoch1 and len(sum(epoch0, [])) == len(sum(epoch1, [])) == -(-len(dataset) // 2)

    first = make()
    seen, videos = [], []
    for k, batch in enumerate(first):
        seen.append(ids(batch))
        videos.append(batch["video"])
        if k == 2:
            state = first.state_dict()  # taken with workers prefetching ahead
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = [ids(b) for b in resumed]
    assert seen + rest == epoch0
    again = make()
    again.load_state_dict(state)
    batch = next(iter(again))
    assert ids(batch) == epoch0[3]
    assert torch.equal(next(iter(make()))["video"], videos[0])  # same pixels, not only the same ids
    assert [ids(b) for b in resumed] == epoch1  # after the resumed epoch, the next one follows


def test_counts_and_shapes_of_a_batch(dataset):
    loader = ClipLoader(dataset, DistributedClipSampler(len(dataset), dp_rank=0, dp_size=1), batch_size=4)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 3, 5, 32, 32) and batch["states"].shape == (4, 5, 25)
    assert batch["num_samples"] == 4 and batch["shard"].dtype == torch.int64
    assert np.isfinite(batch["states"].numpy()).all()


def test_a_state_from_another_dataset_or_seed_is_refused():
    state = DistributedClipSampler(96, dp_rank=0, dp_size=2, seed=5).state_dict(consumed=3)
    with pytest.raises(ValueError, match="96 items / seed 5, this sampler has 95 / 5"):
        DistributedClipSampler(95, dp_rank=0, dp_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="96 items / seed 5, this sampler has 96 / 6"):
        DistributedClipSampler(96, dp_rank=0, dp_size=2, seed=6).load_state_dict(state)


def test_resume_when_the_consumed_count_does_not_divide_the_new_dp_size():
    """20 items consumed at dp 4, resumed at dp 3: the new ranks restart at global position 18 (the last
    multiple of 3), so items 18 and 19 are seen again and nothing is skipped."""
    n = 50
    order = DistributedClipSampler(n, dp_rank=0, dp_size=1, seed=5).epoch_order(0).tolist()
    state = DistributedClipSampler(n, dp_rank=0, dp_size=4, seed=5).state_dict(consumed=5)
    assert state["consumed_global"] == 20
    rest = []
    for r in range(3):
        s3 = DistributedClipSampler(n, dp_rank=r, dp_size=3, seed=5)
        s3.load_state_dict(state)
        assert s3.offset == 6 and len(s3) == 17 - 6
        rest.append(list(s3))
    resumed = [rest[r][k] for k in range(len(rest[0])) for r in range(3)]  # back in global order
    padded = order + order[: -n % 3]
    assert resumed == padded[18:]
