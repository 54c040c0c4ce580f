#!/usr/bin/env bash
# Run on EVERY node: MASTER_ADDR=<node 0 address> NODE_RANK=<0..N-1> NUM_NODES=N GPUS_PER_NODE=8 \
#   bash scripts/multi_node/launch.sh params/02_counting_grpo__sd35m_strict_first_50.yaml
# Start the reward server first (python -m grpo_lib.server ...) and point reward_server_url at it.
set -euo pipefail
PARAMS=${1:?usage: launch.sh params/<file>.yaml}
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}" "${NODE_RANK:?set NODE_RANK}"
NUM_NODES=${NUM_NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${MASTER_PORT:-29503}
cd "$(dirname "$0")/../.."
exec accelerate launch --config_file scripts/accelerate_configs/multi_node.yaml \
    --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$PORT" \
    -m grpo_lib.train "$PARAMS"
