#!/usr/bin/env bash
# Bash argument-based launch on one node (CPU ranks with gloo, or one rank per GPU with NCCL):
#   bash launch/torchrun.sh NPROC MODULE [module args...]
# e.g. bash launch/torchrun.sh 8 megawan.tools.forward_demo --data DIR --tp 4 --cp 2
# Multi-node without SLURM: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC MODULE [args...]" >&2
  exit 2
fi
NPROC=$1; MODULE=$2; shift 2
if [ "${NNODES:-1}" -gt 1 ]; then
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
        --master_port "${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's default, set here so it prints no notice about it
# megatron-core and torch print deprecation notices from every rank; keep the output readable
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning}
# Output live and in order: each rank's stdout is a pipe (block-buffered by Python otherwise), and the filter
# below must pass each line on as it comes. mawk (Debian's awk) reads a pipe in 4 KiB blocks, so progress
# lines would arrive in bursts, after the run, unless -W interactive (line-buffered reads, unbuffered writes).
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
AWK=(awk)
if awk -W version 2>/dev/null | grep -q mawk; then AWK=(awk -W interactive); fi

# A megawan tool that exits with status 3 has already said why (rank 0, once: a layout rule, a missing
# folder), and so has a trainer stopped at once by a second Ctrl-C (status 130). torchrun's own report of
# that failure (its traceback, one entry per stopped rank) is then left out of stderr; any other failure
# keeps it. The exit status is torchrun's either way.
quiet_startup_failure() {
  "${AWK[@]}" '
    held { buf = buf $0 "\n"; next }
    pending != "" { if ($0 ~ /bin\/torchrun"/) { held = 1; buf = pending "\n" $0 "\n"; pending = ""; next }
                    print pending; fflush(); pending = "" }
    /^Traceback \(most recent call last\):$/ { pending = $0; next }
    /closing signal SIGTERM|failed \(exitcode: / { notes = notes $0 "\n"; next }
    { print; fflush() }
    END {
      if (pending != "") print pending
      if (buf !~ /exitcode  *: (3|130) /) printf "%s%s", notes, buf
    }'
}

# Ctrl-C (and SIGTERM / SIGHUP to this script) reach each rank exactly once, from here: torchrun runs in its
# own session, out of the terminal's reach. The trainer's first SIGINT means "checkpoint at the next step
# boundary and exit 0", a second "stop at once" (megawan/training/signals.py). Left in the terminal's
# process group, torchrun would catch the Ctrl-C itself, pass on only the first, print a traceback, and
# kill the ranks 30 s later whatever they were writing.
interrupts=0
forward() {  # SIGNAL -> torchrun's children, the ranks
  local pids
  [ "$1" != INT ] || interrupts=$((interrupts + 1))
  pids=$(ps -o pid= --ppid "$torchrun_pid" 2>/dev/null || true)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -s "$1" $pids 2>/dev/null || true
  fi
}
exec 4> >(trap '' INT; quiet_startup_failure >&2)  # torchrun's stderr, filtered; Ctrl-C does not end the filter
filter_pid=$!
setsid torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m "$MODULE" "$@" 2>&4 &
torchrun_pid=$!
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward HUP' HUP
while :; do  # a trapped signal ends `wait` early: wait again until torchrun has really ended
  rc=0
  wait "$torchrun_pid" || rc=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
exec 4>&-
wait "$filter_pid" 2>/dev/null || true
if [ "$rc" != 0 ] && [ "$interrupts" -ge 2 ]; then rc=130; fi  # stopped at once by a second Ctrl-C
exit "$rc"
