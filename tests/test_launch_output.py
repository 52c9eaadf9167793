"""launch/torchrun.sh passes a rank's output on live: a line a rank prints (stdout or stderr, a plain print
without flush) reaches the launcher's own stdout / stderr while the rank still runs, not when it exits.
The rank is a tiny python module (no training), started by the real torchrun, with one rank."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RANK = '''
import os, pathlib, sys, time
print("rank line on stdout")
print("rank line on stderr", file=sys.stderr)
go = pathlib.Path(os.environ["LIVE_TEST_GO"])
deadline = time.monotonic() + 120  # the test lets it go once it saw both lines; never hang past this
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print("rank exits", file=sys.stderr)
'''


def _lines(stream, q):
    for line in stream:
        q.put(line.rstrip("\n"))
    q.put(None)


def _wait_for(q, text, seen, timeout_s):
    """Read ``q`` until a line holding ``text`` (True) or the timeout / end of stream (False)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            return False
        seen.append(line)
        if text in line:
            return True
    return False


def test_a_rank_line_reaches_the_launcher_before_the_rank_exits(tmp_path):
    (tmp_path / "live_rank.py").write_text(RANK)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LIVE_TEST_GO": str(go), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "1", "live_rank"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_q, err_q = queue.Queue(), queue.Queue()
    for stream, q in ((proc.stdout, out_q), (proc.stderr, err_q)):
        threading.Thread(target=_lines, args=(stream, q), daemon=True).start()
    out_seen, err_seen = [], []
    try:
        live_out = _wait_for(out_q, "rank line on stdout", out_seen, 120)
        live_err = _wait_for(err_q, "rank line on stderr", err_seen, 60 if live_out else 1)
    finally:
        go.write_text("")  # now the rank may exit
        rc = proc.wait(timeout=180)
    _wait_for(err_q, "rank exits", err_seen, 30)
    assert rc == 0, (out_seen, err_seen)
    assert live_out, f"the rank's stdout line came only after it exited: {out_seen}"
    assert live_err, f"the rank's stderr line came only after it exited: {err_seen}"
    assert any("rank exits" in line for line in err_seen)
