#!/usr/bin/env bash
# The README's main job: generate the sample 1X data, then run the parallel TI2V step on 4 CPU ranks
# (TP2 x CP2, gloo) and compare it with a single-rank run of the same weights; the last line is the verdict
# (PASS / FAIL and why), and the exit status is non-zero on FAIL. launch/torchrun.sh sets the thread count and
# quiets the libraries' deprecation notices.
#   bash launch/demo.sh [NPROC] [TP] [CP]
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-4}; TP=${2:-2}; CP=${3:-2}
DATA=${MEGAWAN_DEMO_DATA:-outputs/sample_1x}
[ -d "$DATA/train_v2.0_raw" ] || python -m megawan.tools.make_sample_data --out "$DATA"
exec bash launch/torchrun.sh "$NPROC" megawan.tools.forward_demo --data "$DATA/train_v2.0_raw" --tp "$TP" --cp "$CP"
