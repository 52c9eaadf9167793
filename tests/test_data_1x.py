"""1X reader on generated data: layout, frame/state alignment, window and segment rules."""

import json

import numpy as np
import pytest
import torch

from megawan.data.clip_index import valid_runs
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset, discover_shards
from megawan.tools.make_sample_data import make_sample_data, make_shard, render_frame

SIZE, FRAMES = 64, 120


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample_data(tmp_path_factory.mktemp("s"), train_shards=3, val_shards=1, frames_per_shard=FRAMES,
                            size=SIZE, gop=16, min_segment=20, max_segment=60, captioned_videos=0, workers=2)


def test_layout_matches_the_1x_release(sample):
    train, val = sample / "train_v2.0_raw", sample / "val_v2.0_raw"
    for i in range(3):
        assert (train / "videos" / f"video_{i}.mp4").is_file()
        assert np.fromfile(train / "segment_indices" / f"segment_idx_{i}.bin", np.int32).shape == (FRAMES,)
        assert np.fromfile(train / "robot_states" / f"states_{i}.bin", np.float32).shape == (FRAMES * 25,)
        assert json.loads((train / "metadata" / f"metadata_{i}.json").read_text())["shard_num_frames"] == FRAMES
    assert json.loads((train / "metadata.json").read_text())["hz"] == 30
    for name in ("video_0.mp4", "segment_idx_0.bin", "states_0.bin", "metadata_0.json"):
        assert (val / name).is_file()
    shards, hz = discover_shards(val)
    assert [s.index for s in shards] == [0] and hz == 30
    ids = [np.fromfile(train / "segment_indices" / f"segment_idx_{i}.bin", np.int32) for i in range(3)]
    assert all(len(np.unique(x)) >= 2 for x in ids)  # several segments per shard
    assert len(set().union(*map(set, ids))) == sum(len(np.unique(x)) for x in ids)  # unique across shards


def test_clip_frames_are_rendered_from_the_clip_states(sample):
    """Video and states line up frame by frame: the decoded clip matches a render of its own states far
    better than a render of the states one frame off."""
    ds = WorldModel1XDataset(WorldModel1XConfig(str(sample / "train_v2.0_raw"), clip_frames=9, frame_stride=2))
    shard_states = {s.index: np.fromfile(s.states, np.float32).reshape(-1, 25) for s in ds.shards}
    for clip in (0, len(ds) // 2, len(ds) - 1):
        s = ds[clip]
        assert s["video"].shape == (3, 9, SIZE, SIZE) and s["video"].dtype == torch.float32
        assert -1 <= s["video"].min() and s["video"].max() <= 1
        rows = s["first_frame"] + 2 * np.arange(9)
        assert torch.equal(s["states"], torch.from_numpy(shard_states[s["shard"]][rows]))
        _, _, backgrounds = make_shard(FRAMES, 0, s["shard"], 20, 60)  # shard k was made with seed k
        frames = (s["video"].permute(1, 2, 3, 0) + 1) * 127.5

        def error(offset):  # per-frame error against renders of the states `offset` rows away
            shifted = np.clip(rows + offset, rows.min(), rows.max())  # stays inside the clip's segment
            rendered = np.stack([render_frame(shard_states[s["shard"]][q], backgrounds[q], SIZE) for q in shifted])
            return (frames - torch.from_numpy(rendered).float()).abs().mean().item()

        errors = {offset: error(offset) for offset in (-4, -2, -1, 0, 1, 2, 4)}
        assert errors[0] < 6.0  # H.264 4:2:0 at 64x64: a few levels of 255, mostly at colour edges
        assert min(errors, key=errors.get) == 0, errors


@pytest.mark.parametrize("clip_frames,stride,hop", [(9, 1, 1), (17, 2, 1), (5, 3, 4)])
def test_every_valid_window_and_only_those(sample, clip_frames, stride, hop):
    ds = WorldModel1XDataset(WorldModel1XConfig(str(sample / "train_v2.0_raw"), clip_frames=clip_frames,
                                                frame_stride=stride, window_hop=hop))
    span = (clip_frames - 1) * stride + 1
    assert [s.index for s in ds.shards] == [0, 1, 2]  # every shard of the split, read from its files below
    expected = set()  # brute force: every start whose span has one segment id, on the hop grid of its segment
    for index in range(3):
        ids = np.fromfile(sample / "train_v2.0_raw" / "segment_indices" / f"segment_idx_{index}.bin", np.int32)
        for f in range(len(ids) - span + 1):
            if len(set(ids[f:f + span].tolist())) != 1:
                continue
            segment_start = f
            while segment_start > 0 and ids[segment_start - 1] == ids[f]:
                segment_start -= 1
            if (f - segment_start) % hop == 0:
                expected.add((index, f))
    got = [(ds.shards[p].index, first) for p, first in (ds.index.locate(c) for c in range(len(ds)))]
    assert len(got) == len(set(got)) and set(got) == expected
    assert got == sorted(got)  # (shard, frame) order


def test_the_clip_index_is_ordered_and_located_exactly():
    ids = np.array([0] * 10 + [1] * 3 + [2] * 12, dtype=np.int32)
    runs = valid_runs(ids)
    assert runs.tolist() == [[0, 10], [10, 13], [13, 25]]
    bad = np.zeros(25, bool)
    bad[[4, 20]] = True
    assert valid_runs(ids, bad).tolist() == [[0, 4], [5, 10], [10, 13], [13, 20], [21, 25]]


def test_val_split_and_resize(sample):
    ds = WorldModel1XDataset(WorldModel1XConfig(str(sample / "val_v2.0_raw"), clip_frames=5, size=(32, 48)))
    s = ds[3]
    assert s["video"].shape == (3, 5, 32, 48) and s["states"].shape == (5, 25)
    assert s["shard"] == 0 and s["skipped"] == []


def test_clip_frames_must_be_4n_plus_1(sample):
    with pytest.raises(ValueError, match="4n\\+1"):
        WorldModel1XDataset(WorldModel1XConfig(str(sample / "train_v2.0_raw"), clip_frames=16))
