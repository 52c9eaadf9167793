#!/usr/bin/env bash
# Training from bash arguments: bash launch/train.sh --nproc 4 --tp 2 --cp 2 --config tiny_1x [--section.key V ...]
# (the same as: bash launch/run.sh train ...; see its usage for multi-node and the other commands)
exec bash "$(dirname "$0")/run.sh" train "$@"
