"""Bad input: corrupt / truncated mp4, states length mismatch, short segments, NaN states, hung or dead
loader workers. Each is reported with file and frame, then skipped and counted or raised, per policy."""

import os
import time
from collections import Counter

import av
import numpy as np
import pytest
import torch

from megawan.data import (BadInputError, BadInputReport, ClipLoader, DistributedClipSampler, WorldModel1XConfig,
                          WorldModel1XDataset)
from megawan.tools.make_sample_data import make_sample_data, write_video

FRAMES = 80


@pytest.fixture
def split(tmp_path):
    root = make_sample_data(tmp_path, train_shards=3, val_shards=0, frames_per_shard=FRAMES, size=32, gop=8,
                            min_segment=20, max_segment=40, captioned_videos=0, workers=2)
    return root / "train_v2.0_raw"


def build(split, policy="skip", **kw):
    return WorldModel1XDataset(WorldModel1XConfig(str(split), clip_frames=5, bad_input=policy, **kw))


def test_clean_data_has_no_reports(split):
    ds = build(split)
    assert dict(ds.report.counts) == {}  # the sample data has no segment shorter than min_segment
    assert len(ds.shards) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_video_skips_the_shard_or_raises(split, damage):
    video = split / "videos" / "video_1.mp4"
    data = video.read_bytes()
    video.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    ds = build(split)
    assert ds.report.counts["unreadable_video"] == 1
    assert [s.index for s in ds.shards] == [0, 2]
    with pytest.raises(BadInputError, match="video_1.mp4") as err:
        build(split, "raise")
    assert err.value.kind == "unreadable_video"


def test_truncated_stream_fails_at_the_missing_frame_and_is_replaced(split):
    """moov atom first (faststart): the header still promises every frame, the data for the tail is gone."""
    video = split / "videos" / "video_0.mp4"
    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    write_video(video, frames, gop=8, faststart=True)
    data = video.read_bytes()
    video.write_bytes(data[: int(len(data) * 0.5)])

    ds = build(split)
    assert len(ds.shards) == 3  # the header looks whole
    late = [c for c in range(len(ds)) if ds.index.locate(c)[0] == 0 and ds.index.locate(c)[1] > 60]
    sample = ds[late[0]]
    assert sample["skipped"] and {n.kind for n in sample["skipped"]} == {"decode_error"}
    assert not (sample["shard"] == 0 and sample["first_frame"] > 60)  # a replacement clip
    raising = build(split, "raise")
    with pytest.raises(BadInputError, match=r"video_0.mp4 at frame \d+") as err:
        raising[late[0]]
    assert err.value.frame >= 40

    sampler = DistributedClipSampler(len(ds), dp_rank=0, dp_size=1, shuffle=False)
    loader = ClipLoader(ds, sampler, batch_size=8, num_workers=2, timeout_s=60)
    total = sum(b["num_samples"] for b in loader)
    assert total == len(ds)  # every step still gets a full batch
    assert loader.skip_counts["decode_error"] >= 1  # counted in workers, summed in the main process


def test_states_length_mismatch_is_reported_with_the_file(split):
    states = split / "robot_states" / "states_2.bin"
    np.fromfile(states, np.float32)[: (FRAMES - 3) * 25].tofile(states)
    ds = build(split)
    assert ds.report.counts["length_mismatch"] == 1 and [s.index for s in ds.shards] == [0, 1]
    with pytest.raises(BadInputError, match=r"states_2.bin at frame 77.*states 77"):
        build(split, "raise")


def test_short_segments_and_nan_states(split, caplog):
    before = build(split).report.counts["short_segment"]
    ids_path = split / "segment_indices" / "segment_idx_0.bin"
    ids = np.fromfile(ids_path, np.int32)
    ids[10:13] = 999  # a 3-frame segment: shorter than a 5-frame clip
    ids.tofile(ids_path)
    states_path = split / "robot_states" / "states_1.bin"
    states = np.fromfile(states_path, np.float32).reshape(FRAMES, 25)
    states[[30, 31, 50], 4] = np.nan
    states.tofile(states_path)

    with caplog.at_level("WARNING", logger="megawan.data"):
        ds = build(split)
    assert ds.report.counts["nan_states"] == 3
    assert ds.report.counts["short_segment"] == before + 1  # the planted one
    assert "segment_idx_0.bin at frame 10: 1 segments shorter than a clip" in caplog.text
    for clip in range(len(ds)):
        position, first = ds.index.locate(clip)
        shard = ds.shards[position].index
        assert not (shard == 0 and first < 13 and first + 5 > 10)  # nothing over the short segment
        assert not (shard == 1 and any(first <= r < first + 5 for r in (30, 31, 50)))
        if clip % 7 == 0:
            assert np.isfinite(ds[clip]["states"].numpy()).all()
    with pytest.raises(BadInputError, match="segment_idx_0.bin at frame"):
        build(split, "raise")


class _Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:
            time.sleep(600)
        return {"x": torch.tensor([i])}


class _Dies(_Stuck):
    def __getitem__(self, i):
        if i == 5:
            os._exit(3)
        return {"x": torch.tensor([i])}


# A dead worker must be named as dead, not as a timeout, however loaded the machine: its loader waits 120 s.
# (With 3 s, a worker slow to start under load made the timeout win; the worker's death then reached torch's
# SIGCHLD handler after the test had failed, which raised inside pytest itself and ended the whole run.)
@pytest.mark.parametrize("dataset,timeout_s,message", [(_Stuck(), 3, "no batch within 3"),
                                                       (_Dies(), 120, "exited unexpectedly")])
def test_a_worker_never_hangs_the_job(dataset, timeout_s, message):
    sampler = DistributedClipSampler(8, dp_rank=0, dp_size=1, shuffle=False)
    loader = ClipLoader(dataset, sampler, batch_size=2, num_workers=2, timeout_s=timeout_s)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        for _ in loader:
            pass
    assert time.monotonic() - start < 100  # never the 600 s a worker sleeps, nor the dead worker's 120 s


def _truncate_mid_stream(video, keep: float) -> None:
    """Rewrite ``video`` with its header first (faststart) and cut its data: the header still promises every
    frame, decoding fails where the data stops (a clip corrupted mid-stream)."""
    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    write_video(video, frames, gop=8, faststart=True)
    data = video.read_bytes()
    video.write_bytes(data[: int(len(data) * keep)])


def test_a_training_run_names_each_bad_file_once_then_counts(tmp_path, capfd):
    """2 data-parallel gloo ranks, 2 loader workers each, on data with a video corrupted mid-stream and a short
    segment: each bad file's notice appears once in the output of all processes together, then a count per
    logging interval and a summary at the end, with the counts an independent single-process read of the
    same clips gives."""
    from megawan.testing import run_distributed
    from tests import _train_workers as w

    root = make_sample_data(tmp_path / "data", train_shards=2, val_shards=0, frames_per_shard=FRAMES, size=64,
                            gop=8, min_segment=20, max_segment=40, captioned_videos=0, workers=2)
    split = root / "train_v2.0_raw"
    w.write_prompt(root / "prompt.safetensors")
    _truncate_mid_stream(split / "videos" / "video_0.mp4", keep=0.3)
    ids_path = split / "segment_indices" / "segment_idx_1.bin"
    ids = np.fromfile(ids_path, np.int32)
    ids[10:13] = 999  # a 3-frame segment: shorter than a 9-frame clip
    ids.tofile(ids_path)

    steps, every, dp = 6, 2, 2
    # the oracle: the clips each DP rank reads at each step, read here in one process
    ds = WorldModel1XDataset(WorldModel1XConfig(str(split), clip_frames=9, size=(64, 64)),
                             BadInputReport(announce=False))
    per_step = [Counter() for _ in range(steps)]
    for rank in range(dp):
        order = iter(DistributedClipSampler(len(ds), dp_rank=rank, dp_size=dp, seed=0))
        for s in range(steps):
            per_step[s].update(n.kind for n in ds[next(order)]["skipped"])
    decode_errors = sum(c["decode_error"] for c in per_step)
    assert decode_errors > 0 and set().union(*per_step) == {"decode_error"}  # the set-up does what it means to
    capfd.readouterr()

    results = run_distributed(w.train, dp, w.tiny_overrides(split, tmp_path / "run", **{
        "run.steps": steps, "logging.every": every, "data.num_workers": 2, "parallel.tp": 1, "parallel.cp": 1}),
        False)
    out, err = capfd.readouterr()
    text = out + err
    video, segments = str(split / "videos" / "video_0.mp4"), str(ids_path)
    for kind, path in (("decode_error", video), ("short_segment", segments)):
        assert text.count(f"[{kind}] {path}") == 1, (kind, text)
    assert "bad input found by the data's checks at start: short_segment 1" in text
    for end in range(every, steps + 1, every):
        counts = sum(per_step[end - every:end], Counter())
        line = (f"step {end}: skipped {sum(counts.values())} bad input{'s' if sum(counts.values()) > 1 else ''} "
                f"since step {end - every} (decode_error {counts['decode_error']})")
        assert (line in text) == bool(counts), (line, text)
    assert (f"bad input in this run: {decode_errors + 1} in 2 files (decode_error {decode_errors} in 1 file, "
            f"short_segment 1 in 1 file)") in text, text
    assert results[0]["result"]["bad_input"] == {"decode_error": decode_errors, "short_segment": 1}



@pytest.mark.parametrize("num_clips", [120, 7918, 7920, 1000, 37])
def test_a_bad_stretch_is_left_behind_whatever_the_dataset_size(split, monkeypatch, num_clips):
    """A damaged stretch of consecutive clips (a video truncated half-way) is replaced by a good clip within the
    retries, for any number of clips: the retries hop across the dataset, never clip by clip (the fixed stride
    of 7919 it had is -1 clip modulo 120 and +1 modulo 7918: it walked through the damage clip by clip)."""
    ds = build(split, max_retries=3)
    bad = set(range(num_clips // 2 - num_clips // 8, num_clips // 2 + num_clips // 8))

    def load_clip(i):
        assert 0 <= i < num_clips
        if i in bad:
            raise BadInputError("decode_error", "video_1.mp4", i, "stream ended before this frame")
        return {"clip": i}

    monkeypatch.setattr(WorldModel1XDataset, "__len__", lambda self: num_clips)
    monkeypatch.setattr(ds, "load_clip", load_clip)
    for index in sorted(bad):
        sample = ds[index]
        assert sample["clip"] not in bad and sample["skipped"], index


@pytest.mark.parametrize("rank,named", [("0", 1), ("1", 0)])
def test_evaluate_names_a_bad_file_from_rank_0_only(split, caplog, monkeypatch, rank, named):
    """Every rank of `evaluate` reads the same split; only rank 0 names what it skipped (all ranks count it)."""
    from megawan.evaluate import HeldOutClips

    states_path = split / "robot_states" / "states_1.bin"
    states = np.fromfile(states_path, np.float32).reshape(FRAMES, 25)
    states[30, 4] = np.nan
    states.tofile(states_path)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="megawan.data"):
        clips = HeldOutClips(split, num_clips=2, frames=5)
    assert clips.data.report.counts["nan_states"] == 1
    assert caplog.text.count("states_1.bin") == named, caplog.text
