"""Restart, resume and stopping semantics of the trainer (docs/training.md, "Restart, resume and stopping
semantics"): nothing a restart, a crash, a second run, an evaluation or a Ctrl-C does may lose or corrupt work.

- checkpoint.load is an initial load: reruns resume from the run's own newest checkpoint;
- the evaluation data is checked at start, a step's checkpoint comes before its evaluation, and a failed
  evaluation is logged and survived; rollouts with a latent cache load their VAE once;
- all ranks resume the checkpoint rank 0 chose; an unreadable newest checkpoint falls back to the previous;
- saving a step again never leaves a moment with no copy on disk; the marker follows durable files;
- both non-finite counters survive a resume;
- one run per folder (lock naming the holder; a dead holder's lock is taken over);
- Ctrl-C: the first stops at a step boundary with a checkpoint, a second at once, one line each;
- metrics.jsonl (and TensorBoard) hold each step once after a resume;
- progress is a plain line, not a bar, when the output is not a terminal.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megawan.testing import run_distributed
from megawan.tools.make_sample_data import make_sample_data
from tests import _restart_workers as rw
from tests import _train_workers as w

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_1x")
    make_sample_data(root, train_shards=1, val_shards=1, frames_per_shard=64, size=64, gop=8, captioned_videos=1)
    w.write_prompt(root / "prompt.safetensors")  # tiny_overrides points data.empty_prompt here
    return root / "train_v2.0_raw"


def one_rank(data_root, out, **extra) -> dict:
    return w.tiny_overrides(data_root, out, **{"parallel.tp": 1, "parallel.cp": 1, **extra})


def two_ranks(data_root, out, **extra) -> dict:
    return w.tiny_overrides(data_root, out, **{"parallel.tp": 2, "parallel.cp": 1, **extra})


# ---- where a run starts ---------------------------------------------------------------------------


def test_checkpoint_load_is_only_the_starting_point_of_an_empty_run_folder(data_root, tmp_path):
    """A job started with --checkpoint.load X, rerun with the same arguments (as a SLURM requeue does),
    continues from its own newest checkpoint, not from X again."""
    run_distributed(w.train, 1, one_rank(data_root, tmp_path / "a", **{"run.steps": 6, "run.exit_after_steps": 2}),
                    False)
    x = tmp_path / "a" / "checkpoints" / "step_00000002"
    same_command = one_rank(data_root, tmp_path / "b", **{"run.steps": 6, "run.exit_after_steps": 2,
                                                         "checkpoint.load": str(x)})
    first = run_distributed(rw.train_and_tell, 1, same_command)[0]
    assert (first["resumed_step"], first["result"]["step"]) == (2, 4)
    assert first["reason"].startswith("checkpoint.load (this run folder has no complete checkpoint yet)")
    second = run_distributed(rw.train_and_tell, 1, same_command)[0]
    assert (second["resumed_step"], second["result"]["step"]) == (4, 6), second
    assert second["resumed_from"] == str(tmp_path / "b" / "checkpoints" / "step_00000004")
    assert second["reason"].startswith("the newest complete checkpoint of this run folder; checkpoint.load=")
    assert "is only for a run folder without one, so it is not used" in second["reason"]
    assert f"resume: {second['resumed_from']} ({second['reason']})" in second["log"]  # said in the log
    third = run_distributed(rw.train_and_tell, 1, same_command)[0]
    assert third["result"]["step"] == 6 and third["resumed_step"] == 6  # finished: nothing to redo


def test_a_checkpoint_load_that_cannot_be_loaded_is_refused_at_start(data_root, tmp_path):
    with pytest.raises(RuntimeError, match=r"CheckpointLoadError: checkpoint.load=\S*nowhere cannot be loaded: "
                                           r"it does not exist"):
        run_distributed(rw.build_only, 1, one_rank(data_root, tmp_path / "r",
                                                   **{"checkpoint.load": str(tmp_path / "nowhere")}))


def test_all_ranks_resume_the_checkpoint_rank_0_chose(data_root, tmp_path):
    """Rank 1 sees a stale listing (only step 2); rank 0 sees step 4. Everyone resumes step 4."""
    over = two_ranks(data_root, tmp_path / "run", **{"run.steps": 4, "checkpoint.every": 2})
    run_distributed(w.train, 2, over, False)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    over["run"]["steps"] = 5
    r = run_distributed(rw.stale_listing_on_rank_1, 2, over)[0]
    assert r["result"]["step"] == 5


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(data_root, tmp_path):
    """step_4 lost one rank's shard (as when a second run wrote into the folder): the resume says so, sets
    it aside and continues from step 2, redoing steps 3-4 exactly."""
    over = two_ranks(data_root, tmp_path / "run", **{"run.steps": 4, "checkpoint.every": 2})
    straight = run_distributed(w.train, 2, over, False)[0]
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000004" / "__1_0.distcp").unlink()
    # the same command again (run.steps unchanged: a longer run would decay the learning rate differently)
    r = run_distributed(rw.train_and_tell, 2, over)[0]
    assert r["resumed_from"] == str(ckpts / "step_00000002") and r["result"]["step"] == 4
    assert "step_00000004 is unreadable" in r["reason"]
    assert (ckpts / ".unreadable-step_00000004" / "megawan_checkpoint.json").is_file()
    assert r["steps"] == [1, 2, 3, 4]
    assert r["losses"] == straight["losses"]  # steps 3-4 redone from step 2's state: the same


def test_an_index_that_names_a_file_cut_short_is_unreadable(data_root, tmp_path):
    from megawan.training.checkpointing import checkpoint_problem

    run_distributed(w.train, 1, one_rank(data_root, tmp_path / "run", **{"run.steps": 1}), False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert checkpoint_problem(ckpt) is None
    shard = ckpt / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert checkpoint_problem(ckpt) == f"__0_0.distcp is truncated ({size // 2} of {size} bytes)"


# ---- evaluation --------------------------------------------------------------------------------------


def test_evaluation_data_is_checked_before_training(data_root, tmp_path):
    """Rollouts need raw 1X clips; a folder that is not a 1X split is refused at start, naming the key."""
    captioned = data_root.parent / "captioned"
    with pytest.raises(RuntimeError, match=r"EvaluationDataError: validation.rollout_every=2: the rollouts' clips "
                                           r"\(validation.root: \S+captioned\) cannot be read"):
        run_distributed(rw.build_only, 1, one_rank(data_root, tmp_path / "r", **{
            "validation.root": str(captioned), "validation.rollout_every": 2}))
    with pytest.raises(RuntimeError, match=r"EvaluationDataError: validation.every=2: validation.root=\S+nowhere "
                                           r"cannot be read for validation"):
        run_distributed(rw.build_only, 1, one_rank(data_root, tmp_path / "r", **{
            "validation.root": str(tmp_path / "nowhere"), "validation.every": 2}))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_failed_evaluation_is_logged_and_training_goes_on_after_its_checkpoint(data_root, tmp_path):
    over = two_ranks(data_root, tmp_path / "run", **{
        "run.steps": 4, "checkpoint.every": 2, "validation.every": 2, "validation.num_clips": 1,
        "validation.root": str(data_root.parent / "val_v2.0_raw")})
    r = run_distributed(rw.fail_evaluation_on_rank_1, 2, over, 2)[0]
    assert r["result"]["step"] == 4 and r["checkpoint_before_validation"]
    kinds = [(x["kind"], x["step"]) for x in r["records"] if x["kind"] != "train"]
    assert kinds == [("validation_error", 2), ("validation", 4)], kinds
    error = next(x for x in r["records"] if x["kind"] == "validation_error")
    assert error["error"] == "OSError: planted: a validation clip could not be read (rank 1)"


def test_rollouts_with_a_latent_cache_read_its_raw_clips_and_load_the_vae_once(data_root, tmp_path):
    """The 5B presets' set-up in small: training and validation read latent caches, and rollouts (which
    need videos and states) read the raw split the validation cache was made from, with one VAE."""
    import torch

    from megawan.data import WorldModel1XConfig, WorldModel1XDataset
    from megawan.data.text_encoder import UMT5TextEncoder, save_tiny_umt5
    from megawan.tools.precompute import precompute
    from megawan.training.config import DataSection
    from megawan.training.data import build_vae

    save_tiny_umt5(tmp_path / "umt5", d_model=64)
    text = UMT5TextEncoder(tmp_path / "umt5", dtype=torch.float32)
    # the preset's VAE (data.vae: tiny_sample, a fitted VAE of the package, named, not a path)
    vae = build_vae(DataSection(vae="tiny_sample"), torch.device("cpu"))
    for split, cache in (("train_v2.0_raw", "train_cache"), ("val_v2.0_raw", "val_cache")):
        raw = data_root.parent / split
        source = WorldModel1XDataset(WorldModel1XConfig(str(raw), clip_frames=9, window_hop=9, size=(64, 64)))
        precompute(source, tmp_path / cache, vae=vae, text_encoder=text, samples_per_shard=4, max_samples=4,
                   progress=False, config={"source": "1x", "data": str(raw)})
    over = one_rank(data_root, tmp_path / "run", **{
        "run.steps": 4, "data.source": "cache", "data.root": str(tmp_path / "train_cache"),
        "data.empty_prompt": None, "validation.root": str(tmp_path / "val_cache"), "validation.every": 2,
        "validation.num_clips": 1, "validation.rollout_every": 2, "validation.rollout_clips": 1,
        "validation.rollout_steps": 2})
    r = run_distributed(rw.count_vae_builds, 1, over)[0]
    assert r["result"]["step"] == 4
    assert [x["step"] for x in r["records"] if x["kind"] == "rollout"] == [2, 4]
    assert r["vae_builds"] == 1


def test_rollout_root_of_a_latent_cache_is_the_raw_split_it_was_made_from(tmp_path):
    from megawan.training.config import load_config
    from megawan.training.trainer import EvaluationDataError, rollout_root

    cache, raw = tmp_path / "cache", tmp_path / "raw"
    cache.mkdir()
    (cache / "index.json").write_text("{}")
    cfg = load_config("tiny_1x", {"validation": {"root": str(cache), "rollout_every": 10}})
    with pytest.raises(EvaluationDataError, match=r"is a latent cache: point validation.root at a raw 1X split"):
        rollout_root(cfg)
    (cache / "cache_config.json").write_text(json.dumps({"source": "1x", "data": str(raw)}))
    with pytest.raises(EvaluationDataError, match=rf"is a latent cache made from {raw}, which is not there"):
        rollout_root(cfg)
    raw.mkdir()
    assert rollout_root(cfg) == (str(raw), f"the raw 1X split that validation.root={cache} (a latent cache) was "
                                           f"made from")


# ---- what is saved ------------------------------------------------------------------------------------


def test_saving_a_step_again_keeps_a_copy_of_it_on_disk_at_every_moment(data_root, tmp_path):
    over = one_rank(data_root, tmp_path / "run", **{"run.steps": 2})
    with pytest.raises(RuntimeError, match="rank 0 exited with code 9"):
        run_distributed(rw.save_again_and_die_between_renames, 1, over, grace_s=2)
    again = run_distributed(rw.train_and_tell, 1, over)[0]  # the same command again: run.steps reached
    assert again["resumed_step"] == 2 and again["result"]["step"] == 2, again
    assert again["steps"] == [1, 2]  # nothing trained again
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000002"], names


def test_the_completion_marker_is_written_after_every_file_is_durable(data_root, tmp_path):
    log = tmp_path / "fsync.log"
    over = two_ranks(data_root, tmp_path / "run", **{"run.steps": 1})
    r = run_distributed(rw.fsync_log_of_one_save, 2, over, str(log))[0]
    final = tmp_path / "run" / "checkpoints" / "step_00000001"
    tmp = final.parent / ".tmp-step_00000001"
    files = sorted(p.name for p in final.iterdir())
    assert "__0_0.distcp" in files and "__1_0.distcp" in files and "common.pt" in files
    synced = {line.split(" ", 1)[1] for line in log.read_text().splitlines()}
    for name in files:  # each file, under the name it had while being written
        assert str(tmp / name) in synced, (name, sorted(synced))
    if r["synced_before_marker"] is not None:
        before = {line.split(" ", 1)[1] for line in r["synced_before_marker"]}
        for name in files:
            if name != "megawan_checkpoint.json":
                assert str(tmp / name) in before, name
        ranks = {line.split(" ", 1)[0] for line in r["synced_before_marker"] if ".distcp" in line}
        assert ranks == {"0", "1"}  # each rank synced its own shards before the marker
    assert str(final.parent) in synced  # the folder's entries (the rename) too


def test_both_non_finite_counters_survive_a_resume(data_root, tmp_path):
    over = one_rank(data_root, tmp_path / "run", **{"optim.max_nonfinite_in_a_row": 3})
    r = run_distributed(rw.nonfinite_then_resume, 1, over, 2)[0]
    assert r["restored"] == {"total": 2, "in_a_row": 2}
    assert r["outcome"].startswith("TrainingError: 3 steps in a row had a non-finite loss")


def test_metrics_jsonl_and_tensorboard_hold_each_step_once_after_a_resume(data_root, tmp_path):
    over = one_rank(data_root, tmp_path / "run", **{"run.steps": 5, "checkpoint.every": 2,
                                                   "logging.tensorboard": True})
    with pytest.raises(RuntimeError, match="rank 0 exited with code 3"):
        run_distributed(rw.die_at_step, 1, over, 4, grace_s=2)  # steps 1-3 logged, checkpoint at 2
    r = run_distributed(rw.train_and_tell, 1, over)[0]
    assert r["resumed_step"] == 2 and r["steps"] == [1, 2, 3, 4, 5]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


# ---- one run per folder -------------------------------------------------------------------------------


def test_a_second_run_in_the_same_folder_is_refused_at_once_naming_the_first(data_root, tmp_path):
    import psutil

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".megawan-run.lock"  # held by this process: alive, on this host (written as a run writes it)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "process_start": psutil.Process().create_time(), "started": "2026-01-01T00:00:00",
                                "slurm_job": None, "slurm_restart": 0}))
    proc = subprocess.run([sys.executable, "-m", "megawan.train", *_cli_args(one_rank(data_root, out))],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=_lone_run_env())
    assert lock.exists()  # still the holder's
    lock.unlink()
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert line.startswith(f"FAIL: the job did not start: RunFolderLocked: run folder {out} is in use by another "
                           f"run (host {socket.gethostname()}, pid {os.getpid()}, started ")
    assert "\n" not in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # the lock released, nothing else written


def test_a_lock_left_by_a_run_that_ended_is_taken_over_with_a_warning(tmp_path, caplog, monkeypatch):
    from megawan.training.run_lock import LOCK_NAME, RunFolderLocked, RunLock, holder_info

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps({**holder_info(), "pid": dead.pid, "process_start": 1.0}))
    with caplog.at_level("WARNING", logger="megawan.train"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert f"process {dead.pid} no longer exists on this host" in caplog.text
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
    # another host: cannot be checked from here; refused, saying what to do
    lock_file.write_text(json.dumps({**holder_info(), "host": "node-elsewhere", "pid": 1}))
    with pytest.raises(RunFolderLocked, match=r"host node-elsewhere, pid 1, .*if that run no longer exists "
                                              r"\(its node went down\), delete the lock file"):
        RunLock(tmp_path).acquire()
    # ... unless it was an earlier start of this same SLURM job (requeued onto another node)
    lock_file.write_text(json.dumps({**holder_info(), "host": "node-elsewhere", "pid": 1, "slurm_job": "77",
                                     "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()


# ---- stopping -----------------------------------------------------------------------------------------


def _lone_run_env() -> dict:
    """A single-process run (no launcher) on a free rendezvous port: other runs may hold the default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(port)}


def _cli_args(overrides: dict) -> list[str]:
    args = ["--config", "tiny_1x"]
    for section, values in overrides.items():
        for key, value in values.items():
            args += [f"--{section}.{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _interrupt(cmd: list[str], log: Path, times: int, after: str, timeout_s: float = 600) -> int:
    """Start ``cmd`` in its own process group; once ``after`` is in its output, send SIGINT ``times`` times to
    the whole group, one second apart (what pressing Ctrl-C in a terminal does). Returns the exit status."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_lone_run_env())
    deadline = time.monotonic() + timeout_s
    try:
        while after not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never saw {after!r}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        for _ in range(times):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(1.0)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_in_one_line(data_root, tmp_path):
    out = tmp_path / "run"
    over = one_rank(data_root, out, **{"run.steps": 1000, "logging.every": 1})
    log = tmp_path / "log"
    rc = _interrupt([sys.executable, "-m", "megawan.train", *_cli_args(over)], log, 1, "step 2:")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.count("Ctrl-C: stopping") == 1
    stopped = [line for line in text.splitlines() if line.startswith("preempted: checkpoint ")]
    assert len(stopped) == 1 and stopped[0].endswith("(stop requested by SIGINT)"), text[-2000:]
    step = int(stopped[0].split(" written at step ")[1].split(";")[0])
    assert step >= 2 and (out / "checkpoints" / f"step_{step:08d}" / "megawan_checkpoint.json").is_file()
    assert not (out / ".megawan-run.lock").exists()


def test_a_second_ctrl_c_stops_at_once_in_one_line(data_root, tmp_path):
    out = tmp_path / "run"
    over = one_rank(data_root, out, **{"run.steps": 1000, "logging.every": 1})
    log = tmp_path / "log"
    rc = _interrupt([sys.executable, "-m", "megawan.train", *_cli_args(over)], log, 2, "step 2:")
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.count("Ctrl-C: stopping at the next step boundary") == 1
    assert text.count("Ctrl-C again: stopped at once") == 1
    assert not (out / ".megawan-run.lock").exists()


def test_ctrl_c_under_the_bash_launcher_reaches_each_rank_once(data_root, tmp_path):
    """launch/torchrun.sh (the README's demo path): the ranks checkpoint and exit 0, no torchrun traceback."""
    out = tmp_path / "run"
    over = two_ranks(data_root, out, **{"run.steps": 1000, "logging.every": 1})
    log = tmp_path / "log"
    rc = _interrupt(["bash", "launch/torchrun.sh", "2", "megawan.train", *_cli_args(over)], log, 1, "step 2:")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text
    assert text.count("Ctrl-C: stopping") == 1  # rank 0 says it, once
    stopped = [line for line in text.splitlines() if line.startswith("preempted: checkpoint ")]
    assert len(stopped) == 1 and "(stop requested by SIGINT)" in stopped[0], text[-2000:]


# ---- progress ----------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_off_a_terminal_is_a_plain_line_every_n_seconds():
    from megawan.progress import ProgressLine

    clock, out, err = _Clock(), io.StringIO(), io.StringIO()
    p = ProgressLine(100, desc="train", initial=20, every_s=30, stream=err, out=out, clock=clock)
    assert not p.is_bar
    for step in range(21, 101):
        clock.t += 1.0  # one step per second
        p.update(step, loss="0.5000")
        if step == 50:
            p.write("step 50: a message")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["train: 50/100 steps (50%), 1 steps/s, ETA 0:00:50, loss 0.5000", "step 50: a message",
                     "train: 80/100 steps (80%), 1 steps/s, ETA 0:00:20, loss 0.5000",
                     "train: 100/100 steps (100%), 1 steps/s, ETA 0:00:00, loss 0.5000"], lines
    assert "\r" not in out.getvalue() and err.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar():
    from megawan.progress import ProgressLine

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err, out = Terminal(), io.StringIO()
    p = ProgressLine(10, desc="train", stream=err, out=out)
    assert p.is_bar
    for step in range(1, 11):
        p.update(step, loss="1.0")
    p.close()
    assert "\r" in err.getvalue() and "10/10" in err.getvalue()


def test_the_trainer_draws_no_bar_into_a_log_file(data_root, tmp_path):
    """The default (logging.progress_bar true) with the output going to a file: no carriage returns, and
    progress lines with rate and ETA."""
    over = one_rank(data_root, tmp_path / "run", **{"run.steps": 3, "logging.progress_bar": True,
                                                   "logging.progress_every_s": 0.0})
    proc = subprocess.run([sys.executable, "-m", "megawan.train", *_cli_args(over)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_lone_run_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("train: ")]
    assert [line.split(",")[0] for line in lines] == ["train: 1/3 steps (33%)", "train: 2/3 steps (67%)",
                                                     "train: 3/3 steps (100%)"], proc.stdout
    assert all("ETA " in line and "/s" in line for line in lines[1:])
