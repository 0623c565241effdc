#!/usr/bin/env bash
# 16 ranks on one 8x MI250X node: each MI250X has 2 GCDs (graphics compute dies), and ROCm shows
# each GCD as its own device, so one rank per GCD = 16 ranks.
#   scripts/launch_mi250x_fsdp_pretrain.sh configs/qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml [a.b=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [a.b=value ...]}
shift

# Device visibility: set at most ONE of ROCR_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES (or
# CUDA_VISIBLE_DEVICES). HIP indexes the devices that ROCR left visible, so setting both with the
# same list (e.g. "8,9") can hide every GPU. Here: none, so all 16 GCDs are visible.
unset HIP_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES
# RCCL reads the NCCL_* variables. One node: collectives go over the GCDs' xGMI links, no network.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the chosen rings/trees when debugging a hang
# FSDP's all-gather buffers change size per unit: expandable segments fragment memory less.
export PYTORCH_HIP_ALLOC_CONF=${PYTORCH_HIP_ALLOC_CONF:-expandable_segments:True}
# MIOpen keeps a kernel database under $HOME by default; 16 ranks locking one file on a shared
# filesystem stall, so give the node a local one.
export MIOPEN_USER_DB_PATH=${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER}
export MIOPEN_CUSTOM_CACHE_DIR=${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}
# 8 CPU threads per rank for the DataLoader and host work (a 128-core node / 16 ranks).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec ioe-train launch "$CONFIG" --nproc-per-node 16 "$@"
