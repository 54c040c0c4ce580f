#!/usr/bin/env bash
# Two gloo processes on a CPU-only machine (plain `--cpu` starts only ONE process in accelerate 1.15):
#   bash scripts/accelerate_configs/cpu_2proc.sh params/02_counting_grpo__smoke.yaml
set -euo pipefail
ACCELERATE_USE_CPU=1 exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port "${PORT:-29533}" -m grpo_lib.train "$@"
