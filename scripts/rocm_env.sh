# ROCm environment for the ranks of one MI250X node. Sourced (on every node) by
# scripts/launch_mi250x_fsdp_pretrain.sh, which scripts/slurm_multinode.sbatch runs per node.
# Needs NPROC_PER_NODE: the ranks this node runs, one per GCD (16 on an 8x MI250X node).

# Device visibility. Each MI250X has 2 GCDs and ROCm shows each as a device, so local rank r
# drives the r-th visible GCD. Under Slurm, ROCR_VISIBLE_DEVICES lists the GCDs allocated to the
# job (Slurm counts GCDs as GPUs on MI250X nodes) and it is left as it is. Slurm may also set
# CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES to the same physical ids, but HIP indexes the devices
# ROCR left visible (renumbered 0..n-1), so "8,9" on top of ROCR's "8,9" hides every GPU: unset
# them. Without ROCR_VISIBLE_DEVICES every GCD of the node is visible.
unset HIP_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES
if [[ -n "${ROCR_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -ra _gcds <<< "$ROCR_VISIBLE_DEVICES"
  if (( ${#_gcds[@]} < NPROC_PER_NODE )); then
    echo "error: ROCR_VISIBLE_DEVICES=$ROCR_VISIBLE_DEVICES shows ${#_gcds[@]} GCDs to $NPROC_PER_NODE ranks per node; request one GCD per rank (sbatch --gpus-per-node=$NPROC_PER_NODE)" >&2
    return 1
  fi
fi

# Host threads per rank (DataLoader, host work): this node's CPUs shared by its ranks, e.g.
# 128 cores / 16 ranks = 8. Under Slurm the CPUs are --cpus-per-task (one task per node).
_cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _cpus >= NPROC_PER_NODE ? _cpus / NPROC_PER_NODE : 1 ))}

# FSDP's all-gather buffers change size per unit: expandable segments fragment memory less.
export PYTORCH_HIP_ALLOC_CONF=${PYTORCH_HIP_ALLOC_CONF:-expandable_segments:True}
# MIOpen keeps a kernel database under $HOME by default; 16 ranks locking one file on a shared
# filesystem stall, so give the node a local one.
export MIOPEN_USER_DB_PATH=${MIOPEN_USER_DB_PATH:-/tmp/miopen-${USER:-$(id -un)}}
export MIOPEN_CUSTOM_CACHE_DIR=${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}

# Network (RCCL reads the NCCL_* variables). Within a node collectives use the GCDs' xGMI links
# whatever is set here; between nodes RCCL picks the fastest transport it finds. Never set
# NCCL_IB_DISABLE=1 on a multi-node job: it forces TCP sockets between nodes.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the chosen transport, rings and trees
# The interface for the bootstrap and gloo (the async checkpoint writer's group); rendezvous
# and gloo pick one that reaches the other nodes if unset.
#   export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0          # InfiniBand (IPoIB)
#   export NCCL_SOCKET_IFNAME=hsn0 GLOO_SOCKET_IFNAME=hsn0        # Slingshot
# InfiniBand: RCCL's own IB transport; name the HCAs if the node has others (e.g. storage).
#   export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
#   export NCCL_NET_GDR_LEVEL=3  # GPUDirect RDMA when the NIC and GCD share a PCIe switch
# Slingshot (HPE Cray): RCCL needs the aws-ofi-rccl plugin on LD_LIBRARY_PATH and libfabric's cxi
# provider; without the plugin it falls back to TCP sockets (NCCL_DEBUG=INFO says "NET/Socket").
#   export LD_LIBRARY_PATH=/path/to/aws-ofi-rccl/lib:$LD_LIBRARY_PATH
#   export FI_PROVIDER=cxi NCCL_NET_GDR_LEVEL=3 FI_CXI_DISABLE_CQ_HUGETLB=1
#   export FI_MR_CACHE_MONITOR=userfaultfd FI_CXI_DEFAULT_CQ_SIZE=131072
