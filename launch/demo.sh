#!/usr/bin/env bash
# The README's main job: make the sample 1X data if it is absent, then train the tiny world-model preset
# (configs/train/tiny_1x.yaml) on 4 CPU ranks at TP2 x CP2 with sequence parallelism (gloo) for 800 steps, with
# the tiny VAE fitted to the sample world, and rolls it out on 8 held-out clips (true / zeroed / swapped states).
# It prints where the checkpoints, logs, curves.png, rollout contact sheets and resolved config are, and how to
# resume, open TensorBoard and sample from the run folder.
#   bash launch/demo.sh [NPROC] [--section.key VALUE ...]     e.g. bash launch/demo.sh 2 --parallel.cp 1
# The one-step parallel-vs-single-rank check of the model stays available: megawan.tools.forward_demo.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=4
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
DATA=${MEGAWAN_DEMO_DATA:-outputs/sample_1x}
# 24 training shards of short segments (33-60 frames): ~120 segments, enough for the tiny world model to learn
# the world rather than memorise a few backgrounds (the generator's default, 3 shards, gives 8)
SAMPLE_ARGS=(--train-shards 24 --min-segment 33 --max-segment 60)
[ -d "$DATA/train_v2.0_raw" ] || python -m megawan.tools.make_sample_data --out "$DATA" "${SAMPLE_ARGS[@]}"
if ! grep -q '"num_shards": 24' "$DATA/train_v2.0_raw/metadata.json" 2>/dev/null; then
  echo "note: $DATA is not the demo's sample data (python -m megawan.tools.make_sample_data --out $DATA" \
       "${SAMPLE_ARGS[*]} makes it); the run trains on it as it is" >&2
fi
exec bash launch/torchrun.sh "$NPROC" megawan.train --config tiny_1x \
  --data.root "$DATA/train_v2.0_raw" --validation.root "$DATA/val_v2.0_raw" "$@"
