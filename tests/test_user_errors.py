"""Bad input to a command line gives one line on stderr, no traceback, and exit 3 (``--debug`` / MEGAWAN_DEBUG=1
bring the traceback back). Each case is a real ``python -m ...`` process that must stop at argument / input
checking, before any model is built (a few seconds each, mostly importing torch and megatron)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megawan.parallel_state.launch import STARTUP_ERROR_EXIT, user_errors
from megawan.training import checkpointing
from tests.sampling_fixtures import STATE_DIM, write_release

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny state-conditioned release (no text encoder), an image, a 20-frame context clip, and a folder that
    looks like a training checkpoint."""
    from PIL import Image

    from megawan.tools.make_sample_data import write_video

    root = tmp_path_factory.mktemp("inputs")
    write_release(root / "wm", state_dim=STATE_DIM, text=False)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(root / "first.png")
    write_video(root / "ctx.mp4", [np.zeros((64, 64, 3), np.uint8)] * 20)
    step = root / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / checkpointing.MARKER).write_text("{}")
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MEGAWAN_DEBUG")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


GEN = ["megawan.generate", "--no-text", "--steps", "1", "--out", "o/v.mp4"]

# (id, argv with {in} for the inputs folder, a piece of the one line, a piece it must not hold)
CASES = [
    ("generate-missing-checkpoint", GEN + ["--ckpt", "{in}/nope"], "checkpoint folder {in}/nope does not exist", None),
    ("generate-frames-30", GEN + ["--ckpt", "{in}/wm", "--image", "{in}/first.png", "--frames", "30"],
     "frames must be 4n + 1 (e.g. 77, 121), got 30", None),
    ("generate-size-not-dividing", GEN + ["--ckpt", "{in}/wm", "--image", "{in}/first.png", "--size", "50x96"],
     "--size 50x96: height and width must be multiples of 32 pixels", "resize or crop the input first"),
    ("generate-states-missing", GEN + ["--ckpt", "{in}/wm", "--context", "{in}/ctx.mp4", "--frames", "21"],
     "this world model (state_dim = 25) needs states [21, 25]", None),
    ("generate-missing-data", GEN + ["--ckpt", "{in}/wm", "--data", "{in}/nodata", "--frames", "21"],
     "1X data folder {in}/nodata does not exist", None),  # evaluate reads --data the same way
    ("generate-tp2-without-launcher", GEN + ["--ckpt", "{in}/wm", "--state-dim", "0", "--image", "{in}/first.png",
                                             "--frames", "5", "--tp", "2"],
     "--tp 2 --cp 1 needs 2 ranks: launch with torchrun or srun", None),
    ("generate-dit-is-a-training-step", GEN + ["--dit", "{in}/run/checkpoints/step_00000004", "--vae",
                                               "{in}/wm/Wan2.2_VAE.pth"],
     "is a training checkpoint / run folder, not a DiT folder: pass it as --ckpt", None),
    ("evaluate-frames-30", ["megawan.evaluate", "--ckpt", "{in}/wm", "--data", "{in}/sample", "--frames", "30"],
     "--frames must be 4n + 1", None),
    ("train-load-missing", ["megawan.train", "--config", "tiny_1x", "--parallel.tp", "1", "--parallel.cp", "1",
                            "--run.out_dir", "run", "--checkpoint.load", "{in}/nope"],
     "checkpoint.load={in}/nope cannot be loaded: it does not exist", None),
    ("export-missing-checkpoint", ["megawan.tools.export", "{in}/nope", "out"], "checkpoint {in}/nope does not exist",
     None),
]


@pytest.mark.parametrize("argv,says,never", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_on_stderr_and_exit_3(inputs, tmp_path, argv, says, never):
    proc = _run([a.format(**{"in": inputs}) for a in argv], tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == STARTUP_ERROR_EXIT, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].strip(), proc.stderr[-3000:]
    assert lines[0].startswith("FAIL: the job did not start: ") and "Traceback" not in proc.stderr
    assert says.format(**{"in": inputs}) in lines[0]
    assert never is None or never not in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()  # nothing written


def test_only_rank_0_says_it_and_debug_raises(capsys, monkeypatch):
    monkeypatch.delenv("MEGAWAN_DEBUG", raising=False)
    for rank in (1, 0):
        with pytest.raises(SystemExit) as exit_, user_errors(ValueError, rank=rank):
            raise ValueError("a bad\n  input")
        assert exit_.value.code == STARTUP_ERROR_EXIT
        assert capsys.readouterr().err == ("" if rank else "FAIL: the job did not start: ValueError: a bad input\n")
    with pytest.raises(KeyError), user_errors(ValueError, rank=0):  # not an input error: raised as it is
        raise KeyError("x")
    with pytest.raises(ValueError), user_errors(ValueError, rank=0, debug=True):  # --debug
        raise ValueError("shown with its traceback")
    monkeypatch.setenv("MEGAWAN_DEBUG", "1")
    with pytest.raises(ValueError):
        with user_errors(ValueError, rank=0):
            raise ValueError("shown with its traceback")
    assert capsys.readouterr().err == ""
