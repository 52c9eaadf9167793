# The body shared by launch/slurm/*.sbatch (sourced inside the batch job, not run on its own).
#   MEGAWAN_ROOT=CHECKOUT; source "$MEGAWAN_ROOT/launch/slurm/job.sh"; megawan_job KIND MODULE [arguments]
# KIND: train (checks the run config first) or module (checks that MODULE exists and --tp * --cp divides).
# One srun task per rank (one per GPU on GPU nodes): megawan.parallel_state reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID and takes the rendezvous host from the node list, the port from the job id.
# Training jobs (train.sbatch): a SIGUSR1 to the batch shell (sbatch --signal=B:USR1@SECONDS, or
# scancel --batch --signal=USR1 JOBID) asks the ranks to checkpoint at the next step boundary and exit 0;
# with MEGAWAN_REQUEUE=1 the job then requeues itself and the next start resumes from that checkpoint. The
# ranks are told through a file ($MEGAWAN_STOP_FILE, which rank 0 looks for at every step), not a signal: a
# signal that reaches a rank before Python has installed its handler (interpreter start-up) would end it.
# A SIGUSR1 before the ranks start (train.sbatch notes it from its first line) requeues at once.

megawan_log() { echo "megawan-slurm: $*"; }

megawan_usage() { echo "usage: ${MEGAWAN_USAGE:-sbatch [sbatch options] launch/slurm/JOB.sbatch [arguments]}"; }

# Seconds until this job's time limit (squeue's %L: [D-][HH:]MM:SS), or nothing when it has none.
megawan_time_left_s() {
  local left d=0 h=0 m=0 s=0 parts
  left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null) || return 0
  case $left in ''|UNLIMITED|INVALID|NOT_SET) return 0 ;; esac
  if [[ $left == *-* ]]; then d=${left%%-*}; left=${left#*-}; fi
  IFS=: read -r -a parts <<< "$left"
  case ${#parts[@]} in
    3) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
    2) m=${parts[0]} s=${parts[1]} ;;
    *) s=${parts[0]} ;;
  esac
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

megawan_job() {
  local kind=$1 module=$2
  shift 2
  local root=$MEGAWAN_ROOT  # set by the .sbatch file
  if [ ! -f "$root/megawan/__init__.py" ]; then
    echo "error: '$root' is not a megawan checkout; submit launch/slurm/*.sbatch from one or set MEGAWAN_ROOT" >&2
    return 2
  fi
  cd "$root"  # this checkout's megawan is the one imported; relative paths are relative to it

  # The environment, made explicit: MEGAWAN_ENV is sourced first (e.g. a venv's bin/activate, module loads).
  if [ -n "${MEGAWAN_ENV:-}" ]; then
    # shellcheck disable=SC1090
    source "$MEGAWAN_ENV"
  fi
  local python=${MEGAWAN_PYTHON:-$(command -v python3 || command -v python)}
  # One thread per CPU the task was given (torch would otherwise use every core of the node per rank).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # Logs appear as they are written, not when a buffer fills.
  export PYTHONUNBUFFERED=1
  # megatron-core and torch print the same deprecation notices from every rank.
  export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning}
  # Megatron's TP / SP communication overlap relies on kernels reaching the GPU in issue order (one queue).
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # A failed or timed-out NCCL collective aborts the rank (and srun then the job) instead of hanging it.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Memory of tensors sent by asynchronous collectives is freed when the collective ends, not later.
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  # Activations change size between layouts and clip lengths: growable segments fragment less.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # NCCL's own warnings (a slow transport, a fallback) are worth the job log; INFO is for debugging.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

  local ntasks=${SLURM_NTASKS:-1}
  megawan_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) start $(date -u +%FT%TZ), restart ${SLURM_RESTART_COUNT:-0}," \
    "nodes ${SLURM_JOB_NODELIST:-?}, ${ntasks} task(s), ${SLURM_CPUS_PER_TASK:-1} cpu(s)/task," \
    "gpus/node ${SLURM_GPUS_ON_NODE:-0}"
  megawan_log "checkout $root ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))," \
    "python $python ($("$python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' \
    2>/dev/null || echo 'cannot import torch'))"
  local per_node=${SLURM_NTASKS_PER_NODE:-$ntasks}
  per_node=${per_node%%(*}  # "8(x4)": 8 on each of 4 nodes
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ] && [ "$per_node" != "$SLURM_GPUS_ON_NODE" ]; then
    megawan_log "warning: $per_node task(s) per node for $SLURM_GPUS_ON_NODE GPU(s):" \
      "one task per GPU is expected (--ntasks-per-node = --gpus-per-node)"
  fi

  # Check the arguments, the config and the layout once, before any rank starts.
  local layout
  if [ "$kind" = train ]; then
    local config=tiny_1x overrides=() args=("$@")
    while [ ${#args[@]} -gt 0 ]; do
      case ${args[0]} in
        --config) [ ${#args[@]} -ge 2 ] || { echo "error: --config needs a value" >&2; return 2; }
                  config=${args[1]}; args=("${args[@]:2}") ;;
        --config=*) config=${args[0]#--config=}; args=("${args[@]:1}") ;;
        --print-config) args=("${args[@]:1}") ;;
        *) overrides+=("${args[0]}"); args=("${args[@]:1}") ;;
      esac
    done
    layout=$("$python" launch/check.py --world "$ntasks" train "$config" "${overrides[@]}" 2>&1) \
      || { echo "$layout" >&2; megawan_usage >&2; return 2; }
  else  # generate, evaluate (and forward_demo) take --tp / --cp; precompute has neither
    local tp=1 cp=1 i j
    for ((i = 1; i < $#; i++)); do
      case ${!i} in --tp) j=$((i + 1)); tp=${!j} ;; --cp) j=$((i + 1)); cp=${!j} ;; esac
    done
    layout=$("$python" launch/check.py --world "$ntasks" module "$module" "$tp" "$cp" 2>&1) \
      || { echo "$layout" >&2; megawan_usage >&2; return 2; }
  fi

  # A time limit that leaves no more than the SIGUSR1 lead: the signal would come before any training, the
  # job would requeue, and so on forever. Refuse it now.
  local left
  left=$(megawan_time_left_s)
  if [ "$kind" = train ] && [ -n "$left" ] && [ -n "${MEGAWAN_SIGNAL_LEAD_S:-}" ] \
      && [ "$left" -le "$MEGAWAN_SIGNAL_LEAD_S" ]; then
    echo "error: the job's time limit is ${left} s away, no more than the ${MEGAWAN_SIGNAL_LEAD_S} s before it at" \
      "which SIGUSR1 asks the ranks to checkpoint (--signal=B:USR1@${MEGAWAN_SIGNAL_LEAD_S}): the job would requeue" \
      "forever without training; give it a longer --time (or a shorter lead: --signal=B:USR1@SECONDS with" \
      "MEGAWAN_SIGNAL_LEAD_S=SECONDS)" >&2
    return 2
  fi

  local cmd=(srun --kill-on-bad-exit=1 "$python" -m "$module" "$@")
  megawan_log "$layout; + ${cmd[*]@Q}"

  local preempted=0 interrupted=0 rc=0 step_pid=
  if [ "$kind" = train ]; then
    export MEGAWAN_STOP_FILE="$root/logs/.megawan-stop-${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}"
    rm -f "$MEGAWAN_STOP_FILE"
  fi
  megawan_on_usr1() {
    preempted=1 interrupted=1
    : > "$MEGAWAN_STOP_FILE"  # rank 0 sees it at its next step boundary (or its first, if not started yet)
    megawan_log "SIGUSR1 at $(date -u +%T): asking every rank to checkpoint at the next step boundary and stop"
  }
  megawan_on_term() {  # scancel, or the time limit: SLURM signals the tasks itself; wait for them
    interrupted=1
    megawan_log "SIGTERM at $(date -u +%T): the job is being stopped (no requeue)"
  }
  if [ "$kind" = train ]; then trap megawan_on_usr1 USR1; fi
  trap megawan_on_term TERM

  if [ -n "${MEGAWAN_USR1_AT:-}" ]; then  # noted by train.sbatch's first trap, before this function ran
    preempted=1
    megawan_log "SIGUSR1 at $MEGAWAN_USR1_AT, before the ranks started: nothing to checkpoint, no job step"
  fi
  if [ "$preempted" = 0 ]; then
    "${cmd[@]}" &
    step_pid=$!
    while :; do  # a trapped signal ends `wait` early: wait again until the step has really ended
      interrupted=0 rc=0
      wait "$step_pid" || rc=$?
      [ "$interrupted" = 1 ] || break
    done
    megawan_log "job step ended with status $rc at $(date -u +%T)"
  fi
  trap - USR1 TERM
  [ "$kind" != train ] || rm -f "$MEGAWAN_STOP_FILE"

  if [ "$preempted" = 1 ] && [ "${MEGAWAN_REQUEUE:-0}" = 1 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MEGAWAN_MAX_RESTARTS:-50}" ]; then
      megawan_log "not requeued: restart ${SLURM_RESTART_COUNT} reached MEGAWAN_MAX_RESTARTS=${MEGAWAN_MAX_RESTARTS:-50}"
    else
      # Requeueing ends this batch shell: it is the last thing the job does. SLURM holds a requeued job
      # for a short while (Reason=BeginTime) before it can start again.
      if [ -z "$step_pid" ]; then
        megawan_log "requeueing job $SLURM_JOB_ID: the next start resumes from the newest complete checkpoint, if any"
      elif [ "$rc" = 0 ]; then
        megawan_log "requeueing job $SLURM_JOB_ID: the ranks checkpointed; the next start resumes from there"
      else
        megawan_log "requeueing job $SLURM_JOB_ID, although the job step failed (status $rc) after the SIGUSR1:" \
          "the next start resumes from the newest complete checkpoint, if any"
      fi
      scontrol requeue "$SLURM_JOB_ID" && return 0
      megawan_log "scontrol requeue failed: resubmit the same command to resume"
    fi
  fi
  return "$rc"
}
