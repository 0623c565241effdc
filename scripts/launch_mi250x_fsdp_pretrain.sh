#!/usr/bin/env bash
# 16 ranks on one 8x MI250X node: each MI250X has 2 GCDs (graphics compute dies), and ROCm shows
# each GCD as its own device, so one rank per GCD = 16 ranks. The ROCm environment (device
# visibility, threads, network) is scripts/rocm_env.sh.
#   scripts/launch_mi250x_fsdp_pretrain.sh configs/qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml [a.b=value ...]
# Extra `ioe-train launch` options go after the overrides (scripts/slurm_multinode.sbatch adds
# --nnodes/--rdzv-endpoint to run it on every node of a job).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [a.b=value ...] [ioe-train launch options]}
shift
export NPROC_PER_NODE=${NPROC_PER_NODE:-16}
source "$(dirname "${BASH_SOURCE[0]}")/rocm_env.sh"
exec ioe-train launch "$CONFIG" --nproc-per-node "$NPROC_PER_NODE" "$@"
