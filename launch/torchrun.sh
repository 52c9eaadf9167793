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
exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m "$MODULE" "$@"
