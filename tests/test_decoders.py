"""Decoder backends: random-access windows equal a plain sequential decode, and backends agree."""

import av
import numpy as np
import pytest
import torch

from megawan.data.bad_input import BadInputError
from megawan.data.decoders import AUTO_ORDER, DISABLE_ENV, available_backends, open_video, resolve_backend
from megawan.data.decoders.pyav_reader import PyAVReader
from megawan.tools.make_sample_data import render_frame, segment_background, segment_states, write_video
from tests._decoders import CPU_BACKENDS, expected_backends, require_backend

NUM_FRAMES, GOP = 120, 16


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    rng = np.random.default_rng(0)
    states, background = segment_states(rng, NUM_FRAMES), segment_background(rng)
    path = tmp_path_factory.mktemp("dec") / "v.mp4"
    write_video(path, (render_frame(states[i], background, 64) for i in range(NUM_FRAMES)), gop=GOP)
    return path


@pytest.fixture(scope="module")
def sequential(video):
    """Every frame by a plain front-to-back decode, independent of megawan's readers."""
    with av.open(str(video)) as c:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))


def test_reference_decode_has_all_frames(sequential):
    assert sequential.shape == (NUM_FRAMES, 64, 64, 3)
    assert (sequential[1:].float() - sequential[:-1].float()).abs().mean() > 0.1  # frames differ


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_access_windows_equal_sequential_decode(backend, video, sequential):
    require_backend(backend)
    windows = [[97, 99, 101, 103, 105], list(range(40, 57)), [3], [119], [60, 61, 62], [5, 80, 6]]
    with open_video(video, backend) as reader:
        assert reader.num_frames == NUM_FRAMES
        for window in windows:
            frames = reader.get_frames(window)
            # H.264 decoding is exact, and every CPU backend converts YUV->RGB with FFmpeg's swscale.
            assert torch.equal(frames, sequential[window]), (backend, window)


def test_backends_agree_on_every_frame(video):
    for backend in expected_backends():
        require_backend(backend)
    backends = [b for b in CPU_BACKENDS if b in available_backends()]
    if len(backends) < 2:
        pytest.skip(f"only {backends} of the CPU decoder backends {CPU_BACKENDS} is usable here: nothing to compare")
    decoded = {}
    for backend in backends:
        with open_video(video, backend) as reader:
            decoded[backend] = reader.get_frames(range(NUM_FRAMES))
    for backend in backends[1:]:
        assert torch.equal(decoded[backend], decoded[backends[0]]), backend


def test_pyav_seeks_instead_of_decoding_from_the_start(video, sequential):
    reader = PyAVReader(str(video))
    frames = reader.get_frames([100, 102, 104])
    assert torch.equal(frames, sequential[[100, 102, 104]])
    # keyframe 96 .. 104: at most one GOP plus the window, not 105 frames from the start
    assert reader.decoded_frames <= GOP + 9
    before = reader.decoded_frames
    reader.get_frames([105, 106])  # continues forward without a seek
    assert reader.decoded_frames - before == 2
    reader.close()


def test_out_of_range_is_reported_with_file_and_frame(video):
    with open_video(video, "pyav") as reader, pytest.raises(BadInputError) as err:
        reader.get_frames([118, 119, 120])
    assert err.value.frame == 120 and str(video) in str(err.value)


def test_auto_picks_the_first_importable_backend():
    found = available_backends()
    assert found and found == [b for b in AUTO_ORDER if b in found]
    assert resolve_backend("auto") == found[0]
    with pytest.raises(ValueError):
        resolve_backend("ffmpeg-cli")


def test_disabled_backends_count_as_missing(monkeypatch):
    """MEGAWAN_DISABLE_DECODERS stands in for a machine without a backend (CI: no FFmpeg libraries)."""
    monkeypatch.setenv(DISABLE_ENV, "torchcodec, decord")
    assert set(available_backends()) <= {"pynvvideocodec", "pyav"} and "pyav" in available_backends()
    assert resolve_backend("auto") == "pyav"
    with pytest.raises(RuntimeError, match=f"'torchcodec' is disabled by {DISABLE_ENV}"):
        resolve_backend("torchcodec")
    monkeypatch.setenv(DISABLE_ENV, "ffmpeg")
    with pytest.raises(ValueError, match="unknown decoder backends \\['ffmpeg'\\]"):
        available_backends()
