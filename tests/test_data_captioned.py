"""Captioned-folder dataset: jsonl and csv captions, aspect-kept resize + centre crop, short videos."""

import csv

import numpy as np
import pytest
import torch

from megawan.data import CaptionedFolderConfig, CaptionedVideoFolder
from megawan.data.transforms import resize_center_crop
from megawan.tools.make_sample_data import write_captioned_folder, write_video


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    write_captioned_folder(root, num_videos=4, num_frames=21)
    return root


def test_jsonl_clips_have_the_target_size_and_captions(folder):
    ds = CaptionedVideoFolder(CaptionedFolderConfig(str(folder), size=(32, 48), clip_frames=9, frame_stride=2))
    assert len(ds) == 4
    for i in range(4):
        s = ds[i]
        assert s["video"].shape == (3, 9, 32, 48) and -1 <= s["video"].min() and s["video"].max() <= 1
        assert s["caption"].endswith(f"clip {i}") and s["skipped"] == []


def test_csv_captions_and_centre_clip(folder, tmp_path):
    with (folder / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption"])
        w.writerow(["clip_1.mp4", "tall video"])
    ds = CaptionedVideoFolder(CaptionedFolderConfig(str(folder), size=(16, 16), clip_frames=5,
                                                    captions_file="captions.csv", clip_start="center"))
    s = ds[0]
    assert s["caption"] == "tall video" and s["first_frame"] == (21 - 5) // 2
    (folder / "captions.csv").unlink()


def test_resize_keeps_aspect_and_crops_the_centre():
    # a 40x80 frame whose left and right quarters are 0 and middle half is 255
    frame = torch.zeros(1, 3, 40, 80)
    frame[..., 20:60] = 255
    out = resize_center_crop(frame, (20, 20))  # scale 0.5 -> 20x40, keep the middle 20 columns
    assert out.shape == (1, 3, 20, 20)
    assert out[..., 2:-2].min() > 250  # only the bright middle half survives the crop
    up = resize_center_crop(torch.rand(2, 3, 10, 30), (20, 20))  # upscale covers, then crops the width
    assert up.shape == (2, 3, 20, 20)


def test_short_video_is_skipped_or_raised(folder, tmp_path):
    root = tmp_path / "f"
    write_video(root / "short.mp4", [np.zeros((16, 16, 3), np.uint8)] * 3)
    write_video(root / "ok.mp4", [np.full((16, 16, 3), 200, np.uint8)] * 9)
    (root / "captions.jsonl").write_text('{"video": "short.mp4", "caption": "a"}\n{"video": "ok.mp4", "caption": "b"}\n')
    ds = CaptionedVideoFolder(CaptionedFolderConfig(str(root), size=(16, 16), clip_frames=5))
    s = ds[0]
    assert s["caption"] == "b" and [n.kind for n in s["skipped"]] == ["short_video"] and ds.report.counts["short_video"] == 1
    strict = CaptionedVideoFolder(CaptionedFolderConfig(str(root), size=(16, 16), clip_frames=5, bad_input="raise"))
    with pytest.raises(Exception, match=r"short.mp4 at frame 3"):
        strict[0]
