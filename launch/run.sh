#!/usr/bin/env bash
# Run a megawan job with torchrun from bash arguments (no scheduler): one node, or one call per node.
# Checks the arguments, the config and the layout first, prints the resolved command, then runs it.
# See usage() below and docs/launch.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${MEGAWAN_PYTHON:-python}

usage() {
  cat <<'EOF'
usage: bash launch/run.sh COMMAND [launch options] [-- module arguments]
  COMMAND     train | precompute | generate | evaluate | module MODULE
              (megawan.train, megawan.tools.precompute, megawan.generate, megawan.evaluate, or any module)
launch options:
  --nproc N            ranks on this node (alias --gpus-per-node; default: the GPUs nvidia-smi lists, else 1)
  --nodes N            nodes in the job (default 1); with N > 1 run the same command on every node with
  --node-rank R        this node's index (0 .. N-1)
  --master-addr HOST   node 0's address, reachable from every node
  --master-port PORT   (default 29500)
  --tp N, --cp N       tensor / context parallel sizes; tp * cp must divide nodes x nproc
                       (train: sets --parallel.tp / --parallel.cp; generate, evaluate, module: --tp / --cp)
  --config C           train only: a preset name (tiny_1x, ti2v5b_1x, ...) or a YAML file
  --dry-run            check and print the command, run nothing
  -h, --help
train also takes the config's overrides directly: --section.key VALUE (e.g. --run.steps 20).
Everything after -- goes to the module unchanged. Paths are relative to the checkout's root.
examples:
  bash launch/run.sh train --nproc 4 --tp 2 --cp 2 --config tiny_1x --run.steps 20
  bash launch/run.sh train --nproc 8 --config ti2v5b_1x --run.out_dir runs/wm
  bash launch/run.sh precompute --nproc 8 -- --source 1x --data D --out cache/x --vae V --text-encoder T
  bash launch/run.sh module megawan.tools.forward_demo --nproc 4 --tp 2 --cp 2 -- --data D
EOF
}

die() {  # a bad argument: say which, show the usage, start nothing
  echo "error: $*" >&2
  usage >&2
  exit 2
}

positive() {  # positive FLAG VALUE: an integer >= 1 or die naming the flag
  [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] || die "$1 needs a positive integer, got '$2'"
}

[ $# -ge 1 ] || die "missing COMMAND"
case $1 in
  -h|--help) usage; exit 0 ;;
  train) MODULE=megawan.train ;;
  precompute) MODULE=megawan.tools.precompute ;;
  generate) MODULE=megawan.generate ;;
  evaluate) MODULE=megawan.evaluate ;;
  module) [ $# -ge 2 ] && [[ $2 != -* ]] || die "module needs a MODULE name"; MODULE=$2; shift ;;
  *) die "unknown COMMAND '$1'" ;;
esac
COMMAND=$1; shift

NPROC=""; NNODES=1; NODE_RANK=""; MASTER_ADDR_ARG=""; MASTER_PORT_ARG=29500
TP=""; CP=""; CONFIG=""; DRY_RUN=0; PASS=()
while [ $# -gt 0 ]; do
  opt=$1
  case $opt in
    --nproc|--gpus-per-node|--nodes|--node-rank|--master-addr|--master-port|--tp|--cp|--config)
      [ $# -ge 2 ] || die "$opt needs a value"
      val=$2; shift 2 ;;
    --nproc=*|--gpus-per-node=*|--nodes=*|--node-rank=*|--master-addr=*|--master-port=*|--tp=*|--cp=*|--config=*)
      val=${opt#*=}; opt=${opt%%=*}; shift ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PASS+=("$@"); break ;;
    --*.*)  # a config override: train only
      [ "$COMMAND" = train ] || die "unknown option '$opt' (module arguments go after --)"
      if [[ $opt == *=* ]]; then PASS+=("$opt"); shift
      else [ $# -ge 2 ] || die "$opt needs a value"; PASS+=("$opt" "$2"); shift 2; fi
      continue ;;
    *) if [ "$COMMAND" = train ]; then die "unknown option '$opt' (config overrides are --section.key VALUE)"
       else die "unknown option '$opt' (module arguments go after --)"; fi ;;
  esac
  case $opt in
    --nproc|--gpus-per-node) positive "$opt" "$val"; NPROC=$val ;;
    --nodes) positive "$opt" "$val"; NNODES=$val ;;
    --node-rank) [[ $val =~ ^[0-9]+$ ]] || die "--node-rank needs an integer, got '$val'"; NODE_RANK=$val ;;
    --master-addr) MASTER_ADDR_ARG=$val ;;
    --master-port) positive "$opt" "$val"; MASTER_PORT_ARG=$val ;;
    --tp) positive "$opt" "$val"; TP=$val ;;
    --cp) positive "$opt" "$val"; CP=$val ;;
    --config) [ "$COMMAND" = train ] || die "--config is for train (pass module arguments after --)"; CONFIG=$val ;;
  esac
done

if [ -z "$NPROC" ]; then
  NPROC=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true)
  [ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=1
fi
if [ "$NNODES" -gt 1 ]; then
  [ -n "$NODE_RANK" ] || die "--nodes $NNODES needs --node-rank (this node's index)"
  [ -n "$MASTER_ADDR_ARG" ] || die "--nodes $NNODES needs --master-addr (node 0's address)"
  [ "$NODE_RANK" -lt "$NNODES" ] || die "--node-rank $NODE_RANK is not below --nodes $NNODES"
fi
[ "$COMMAND" != precompute ] || [ -z "$TP$CP" ] \
  || die "precompute has no tp / cp (it shards the VAE with --vae-shards after --)"
WORLD=$((NNODES * NPROC))

cd "$ROOT"
if [ "$COMMAND" = train ]; then
  OVERRIDES=("${PASS[@]}")
  [ -z "$TP" ] || OVERRIDES+=(--parallel.tp "$TP")
  [ -z "$CP" ] || OVERRIDES+=(--parallel.cp "$CP")
  ARGS=(--config "${CONFIG:-tiny_1x}" "${OVERRIDES[@]}")
  LAYOUT=$("$PYTHON" launch/check.py --world "$WORLD" train "${CONFIG:-tiny_1x}" "${OVERRIDES[@]}" 2>&1) \
    || die "${LAYOUT#error: }"
else
  ARGS=("${PASS[@]}")
  [ -z "$TP" ] || ARGS+=(--tp "$TP")
  [ -z "$CP" ] || ARGS+=(--cp "$CP")
  LAYOUT=$("$PYTHON" launch/check.py --world "$WORLD" module "$MODULE" "${TP:-1}" "${CP:-1}" 2>&1) \
    || die "${LAYOUT#error: }"
fi

CMD=(bash launch/torchrun.sh "$NPROC" "$MODULE" "${ARGS[@]}")
[ "$NNODES" -eq 1 ] || CMD=(env NNODES="$NNODES" NODE_RANK="$NODE_RANK" MASTER_ADDR="$MASTER_ADDR_ARG"
                            MASTER_PORT="$MASTER_PORT_ARG" "${CMD[@]}")
echo "megawan: $COMMAND on $NNODES node(s) x $NPROC rank(s), $LAYOUT; python $(command -v "$PYTHON")"
echo "+ ${CMD[*]@Q}"
[ "$DRY_RUN" -eq 0 ] || exit 0
exec "${CMD[@]}"
