"""launch/slurm/*.sbatch on a real single-node SLURM (slurmctld + slurmd + munged on localhost, CPU tasks, gloo).

The training job is preempted by hand the way ``--signal=B:USR1@300`` does before the time limit
(SIGUSR1 to the batch shell), checkpoints, requeues itself, and resumes at the right step and data
position: every step's loss equals that of an uninterrupted run of the same config started with
launch/train.sh (torchrun, no SLURM).
A SIGUSR1 at any moment of a job's start (before the ranks run, or while they import) requeues it; a
time limit within the signal's lead is refused at start; the log holds plain progress lines, no bar.
Skipped where Debian's slurm-wlm / munge are not installed or not root, except where MEGAWAN_EXPECT_SLURM=1
(``.ci/run`` sets it after installing them): there a missing SLURM fails the tests instead of hiding them.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megawan.parallel_state.launch import free_port
from megawan.tools.make_sample_data import make_sample_data
from tests.slurm_cluster import LocalSlurm, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
CPU_RANKS = {"MEGAWAN_PYTHON": sys.executable, "MEGAWAN_BACKEND": "gloo"}  # gloo even where CUDA exists
LOSS_RTOL = 1e-6  # same ranks, layout and arithmetic: the resumed run repeats the straight one

REPO_CI = REPO / ".ci" / "run"


def require_slurm(reason: str | None, expected: bool) -> None:
    """Skip (saying why) when SLURM cannot run here; fail instead where it is expected (CI installs it)."""
    if reason is None:
        return
    if expected:
        pytest.fail(f"MEGAWAN_EXPECT_SLURM=1 but the SLURM tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_slurm(unavailable_reason(), os.environ.get("MEGAWAN_EXPECT_SLURM") == "1")
    # distinct job ids per run: the job logs (logs/megawan-train-JOBID.out) never meet an old one
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=4, first_job_id=random.randint(10_000, 900_000)) as s:
        yield s


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = make_sample_data(tmp_path_factory.mktemp("data"), train_shards=1, val_shards=0, frames_per_shard=64,
                            size=64, gop=8)
    return root / "train_v2.0_raw"


def train_args(data_root, out_dir) -> list[str]:
    return ["--config", "tiny_1x", "--parallel.tp", "2", "--parallel.cp", "1", "--data.root", str(data_root),
            "--run.out_dir", str(out_dir), "--run.steps", str(STEPS), "--checkpoint.every", "0",
            "--validation.every", "0", "--validation.rollout_every", "0", "--data.batch_size", "2",
            "--data.window_hop", "1", "--objective.shift", "1.0", "--optim.warmup_steps", "5",
            "--logging.every", "1", "--logging.progress_every_s", "5"]


def submit(slurm, script: str, sbatch_args: list[str], args: list[str], logs: list[Path]) -> tuple[int, Path]:
    """Submit from the checkout's root as a user would; the job's log file is removed after the test."""
    job = slurm.sbatch([*sbatch_args, f"launch/slurm/{script}", *args], cwd=REPO, env=CPU_RANKS)
    log = REPO / "logs" / f"megawan-{script.split('.')[0]}-{job}.out"
    logs.append(log)
    return job, log


@pytest.fixture
def job_logs():
    logs: list[Path] = []
    yield logs
    for log in logs:
        log.unlink(missing_ok=True)


def wait_for(predicate, timeout_s: float, what: str, slurm=None, job=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    info = slurm.job(job) if slurm is not None else {}
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; job: {info}")


def steps_logged(out_dir: Path) -> list[dict]:
    path = out_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def test_training_job_is_preempted_requeues_itself_and_resumes(slurm, data_root, tmp_path, job_logs):
    out = tmp_path / "run"
    job, log = submit(slurm, "train.sbatch", ["--ntasks=2"], train_args(data_root, out), job_logs)
    # the uninterrupted reference run (torchrun, no SLURM) runs meanwhile: the job spends most of its time
    # waiting on SLURM (requeue, release, restart), not computing
    ref_out = tmp_path / "straight"
    straight = subprocess.Popen(["bash", "launch/train.sh", "--nproc", "2", *train_args(data_root, ref_out)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **CPU_RANKS, "MASTER_PORT": str(free_port())})
    try:
        _preempt_and_resume(slurm, job, log, out)
    finally:
        try:
            straight_log, _ = straight.communicate(timeout=600)
        finally:
            straight.kill()
    assert straight.returncode == 0, straight_log[-4000:]
    # every step logged once, in order, with the losses, gradient norms and learning rates of an uninterrupted
    # run: the resume restored the weights, optimizer, step, data position and noise
    resumed = steps_logged(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    reference = steps_logged(ref_out)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=LOSS_RTOL), a["step"]


def _preempt_and_resume(slurm, job, log, out):
    """Preempt the running job, let it requeue and finish; check what its log and run folder say."""
    slurm.wait_state(job, {"RUNNING"}, 120)
    # preempt once the trainer is inside its loop: what --signal=B:USR1@300 does before the time limit
    wait_for(lambda: len(steps_logged(out)) >= 2, 300, "two training steps", slurm, job)
    signalled = slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert signalled.returncode == 0, signalled.stderr
    # the job requeues itself; SLURM then holds it for a while (Reason=BeginTime): release it now
    wait_for(lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job).get("JobState") == "PENDING", 300,
             "the job to requeue itself", slurm, job)
    # only once the first start has left the node, and a second later: slurmd refuses a job credential
    # issued in the same second as the old one's revocation ("Job credential revoked")
    wait_for(slurm.node_idle, 120, "the node to be released", slurm, job)
    time.sleep(2)
    assert slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    text = log.read_text()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        pytest.fail(f"job {info['JobState']} {info['ExitCode']}; its log ends:\n{text[-5000:]}\n"
                    f"{slurm.logs_tail()}", pytrace=False)
    assert info["Restarts"] == "1"

    # first start: stopped by the signal at a step boundary with a checkpoint, then requeued
    preempted = re.findall(r"^preempted: checkpoint (\S+) written at step (\d+)", text, re.M)
    assert len(preempted) == 1, text[-3000:]
    stop = int(preempted[0][1])
    assert 2 <= stop < STEPS
    assert Path(preempted[0][0]) == out / "checkpoints" / f"step_{stop:08d}"
    assert f"requeueing job {job}" in text
    # second start (same job id, same log appended): resumes from that checkpoint and finishes
    assert re.search(rf"^megawan-slurm: job {job} \(megawan-train\) start .*restart 1,", text, re.M)
    assert re.search(rf"resumed from \S+/step_{stop:08d}\b", text)
    assert f"done: step {STEPS}," in text
    assert "Warning" not in text  # the libraries' per-rank notices stay out of the job log
    # progress: plain lines in the log (not a terminal), never a bar whose carriage returns glue lines together
    assert "\r" not in text and re.search(rf"^train: \d+/{STEPS} steps \(\d+%\), .*ETA", text, re.M), text[-3000:]
    for step in (stop, STEPS):
        assert (out / "checkpoints" / f"step_{step:08d}" / "megawan_checkpoint.json").is_file()
    assert (out / "resolved_config.yaml").is_file() and any((out / "logs" / "tensorboard").iterdir())


@pytest.mark.parametrize("script,args,message", [
    ("train.sbatch", ["--config", "no_such_config.yaml"], "'no_such_config.yaml' is neither a file nor a preset"),
    ("train.sbatch", ["--config", "tiny_1x", "--optim.lrr", "1"], "unknown config key optim.lrr"),
    ("train.sbatch", ["--config", "tiny_1x", "--parallel.tp", "2", "--parallel.cp", "2"],
     "does not divide the 2 ranks"),
    ("evaluate.sbatch", ["--data", "x", "--tp", "4"], "does not divide the 2 ranks"),
])
def test_a_job_with_bad_arguments_fails_before_any_rank_starts(slurm, script, args, message, tmp_path, job_logs):
    job, log = submit(slurm, script, ["--ntasks=2"], [*args, "--run.out_dir", str(tmp_path / "run")]
                      if script == "train.sbatch" else args, job_logs)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    assert message in text and f"usage: sbatch [sbatch options] launch/slurm/{script}" in text
    assert "'srun'" not in text and not (tmp_path / "run").exists()  # no job step, no output


def _until_requeued(slurm, job):
    wait_for(lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job).get("JobState") == "PENDING", 300,
             "the job to requeue itself", slurm, job)


def test_a_sigusr1_before_the_ranks_start_requeues_the_job(slurm, data_root, tmp_path, job_logs):
    """The issue's reproduction: USR1 as soon as the job's log exists (the batch shell is still checking the
    config). It used to end the shell (FAILED 0:10, no requeue, a silent log)."""
    out = tmp_path / "run"
    job, log = submit(slurm, "train.sbatch", ["--ntasks=2"], train_args(data_root, out), job_logs)
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 120, "the job's log", slurm, job)
    assert slurm.run(["scancel", "--batch", "--signal=USR1", str(job)]).returncode == 0
    _until_requeued(slurm, job)
    slurm.run(["scancel", str(job)])
    text = log.read_text()
    assert re.search(r"^megawan-slurm: SIGUSR1 at \S+, before the ranks started: nothing to checkpoint, no job step$",
                     text, re.M), text
    assert f"requeueing job {job}: the next start resumes from the newest complete checkpoint, if any" in text
    assert "'srun'" in text and "job step ended" not in text  # checked, but no rank was started


def test_a_sigusr1_while_the_ranks_import_stops_them_at_their_first_step(slurm, data_root, tmp_path, job_logs):
    """USR1 once srun has started the ranks, while they import torch and megatron: they used to die of it
    (status 138) while the log promised a resume from a checkpoint that did not exist."""
    out = tmp_path / "run"
    job, log = submit(slurm, "train.sbatch", ["--ntasks=2"], train_args(data_root, out), job_logs)
    wait_for(lambda: log.exists() and "+ 'srun'" in log.read_text(), 180, "the job step", slurm, job)
    time.sleep(1)  # srun has started the ranks: python and its imports
    assert slurm.run(["scancel", "--batch", "--signal=USR1", str(job)]).returncode == 0
    _until_requeued(slurm, job)
    slurm.run(["scancel", str(job)])
    text = log.read_text()
    stopped = re.findall(r"^preempted: checkpoint (\S+) written at step (\d+);", text, re.M)
    assert len(stopped) == 1, text[-3000:]
    assert (Path(stopped[0][0]) / "megawan_checkpoint.json").is_file()
    assert "job step ended with status 0" in text and "status 138" not in text
    assert f"requeueing job {job}: the ranks checkpointed; the next start resumes from there" in text


def test_a_time_limit_within_the_signal_lead_is_refused_at_start(slurm, data_root, tmp_path, job_logs):
    """--time 4 minutes with --signal=B:USR1@300: SIGUSR1 would come before any step, forever."""
    job, log = submit(slurm, "train.sbatch", ["--ntasks=2", "--time=4"], train_args(data_root, tmp_path / "run"),
                      job_logs)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    assert re.search(r"error: the job's time limit is \d+ s away, no more than the 300 s before it at which SIGUSR1 "
                     r"asks the ranks to checkpoint", text), text
    assert "'srun'" not in text and not (tmp_path / "run").exists()


def test_a_missing_slurm_fails_where_it_is_expected_and_skips_elsewhere():
    require_slurm(None, expected=True)
    with pytest.raises(pytest.fail.Exception, match="MEGAWAN_EXPECT_SLURM=1 but the SLURM tests cannot run: gone"):
        require_slurm("gone", expected=True)
    with pytest.raises(pytest.skip.Exception, match="gone"):
        require_slurm("gone", expected=False)


def test_ci_shows_skips_and_fails_when_slurm_cannot_be_installed():
    ci = REPO_CI.read_text()
    runs = [line for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert runs and all(" -rs" in line for line in runs), runs
    assert "export MEGAWAN_EXPECT_SLURM=1" in ci
    install = ci[ci.index("apt-get install -y -qq slurm-wlm munge"):]
    install = install[:install.index("\nfi\n")]
    assert "exit 1" in install and "will skip" not in install, install
