#!/bin/bash
# Multi-GPU / multi-node GenLoc training with torchrun (no scheduler). Run it once per node:
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/torchrun.sh experiment=pipe_pretrain ...
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/torchrun.sh experiment=pipe_pretrain ...
# Arguments are train.py overrides; trainer.num_nodes / trainer.devices follow NNODES / NPROC_PER_NODE.
# All nodes must see the same log_root (shared filesystem): checkpoints and resume live there.
# To stop for a restart: `kill -USR1 <pid of a training process>` saves last.ckpt at the next step
# on every rank and exits; running the same command again resumes from it.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "${NPROC_PER_NODE}" -gt 0 ] || NPROC_PER_NODE=1   # no GPU: one process
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-.venv/bin/python}
TRAINER=${TRAINER:-ddp}   # ddp_cpu for gloo on CPUs
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false

cd "$(dirname "$0")/.."
exec "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NNODES}" --node_rank="${NODE_RANK}" --nproc_per_node="${NPROC_PER_NODE}" \
    --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}" \
    train.py trainer="${TRAINER}" trainer.num_nodes="${NNODES}" trainer.devices="${NPROC_PER_NODE}" "$@"
