"""A throw-away single-node SLURM on localhost for the launch tests.

munged, slurmctld and slurmd run in the foreground as children of the test, with their key, config,
state, spool, sockets and logs in one temporary folder and free TCP ports, so nothing touches the
machine's own /etc/slurm or /etc/munge. ``stop()`` cancels what is still queued and ends the three
daemons by PID. Debian's ``slurm-wlm`` and ``munge`` packages provide the binaries (``.ci/run``
installs them); slurmd must run as root to start jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def unavailable_reason() -> str | None:
    """Why a local SLURM cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} missing): "
                f"apt-get install slurm-wlm munge (.ci/run does this)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    host = socket.gethostname()
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"this machine's host name {host!r} does not resolve (the job's rendezvous needs it)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """``with LocalSlurm(tmp, cpus=4) as slurm: slurm.sbatch([...])``."""

    def __init__(self, root: Path, cpus: int = 4, first_job_id: int = 1):
        self.root = Path(root)
        self.cpus = cpus
        self.first_job_id = first_job_id  # job logs are named by job id: distinct ids keep runs apart
        self.host = socket.gethostname()
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- start / stop ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={sock}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--seed-file={r / 'munge' / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait(lambda: sock.exists(), timeout_s, "munged's socket")
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(self._config(sock))
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self.node_idle, timeout_s, "the node to register as idle")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_binary("scancel"), "--full", "--signal=KILL", "--partition=debug"], env=self.env,
                           capture_output=True, timeout=30)
            subprocess.run([_binary("scancel"), "--partition=debug"], env=self.env, capture_output=True, timeout=30)
            try:
                self._wait(lambda: not self.queue(), timeout_s, "the queue to empty")
            except TimeoutError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # -- client commands ---------------------------------------------------------------------------
    def run(self, args: list[str], cwd=None, env: dict | None = None, timeout_s: float = 60.0):
        return subprocess.run(args, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout_s)

    def sbatch(self, args: list[str], cwd, env: dict | None = None) -> int:
        out = self.run([_binary("sbatch"), "--parsable", *args], cwd=cwd, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def queue(self) -> list[str]:
        out = self.run([_binary("squeue"), "--noheader", "--format=%i %T"])
        return out.stdout.split("\n") if out.stdout.strip() else []

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run([_binary("scontrol"), "show", "job", "--oneliner", str(job_id)])
        fields = {}
        for token in out.stdout.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout_s: float) -> dict:
        """Poll until the job reaches one of ``states``; TimeoutError with the job's record otherwise."""
        deadline = time.monotonic() + timeout_s
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {info}\n"
                           f"{self.logs_tail()}")

    def logs_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    out = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited ({proc.returncode}) waiting for {what}:\n{out}\n"
                                       f"{self.logs_tail()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs_tail()}")

    def node_idle(self) -> bool:
        out = self.run([_binary("sinfo"), "--noheader", "--format=%T"], timeout_s=20)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _config(self, munge_socket: Path) -> str:
        r = self.root
        return f"""\
ClusterName=megawantest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
PlugStackConfig={r / 'plugstack.conf'}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
FirstJobId={self.first_job_id}
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
