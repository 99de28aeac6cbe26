#!/usr/bin/env bash
# Submit kforcing_jax to a SLURM GPU cluster: one process per GPU, JAX's SLURM detection.
#   launch/slurm_gpu.sh --nodes=2 --gpus_per_node=8 --config=configs/owt.py \
#       --workdir=/shared/kf_owt [--partition=gpu] [--time=24:00:00] [--dry_run] [-- overrides]
# Writes the batch script to stdout with --dry_run; otherwise pipes it to sbatch.
set -euo pipefail
NODES= GPUS= CONFIG= WORKDIR= PARTITION= TIME=24:00:00 DRY=0 EXTRA=()
for arg in "$@"; do
  if [[ ${#EXTRA[@]} -gt 0 || "$arg" == "--" ]]; then EXTRA+=("$arg"); continue; fi
  case "$arg" in
    --nodes=*) NODES=${arg#*=} ;; --gpus_per_node=*) GPUS=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;; --workdir=*) WORKDIR=${arg#*=} ;;
    --partition=*) PARTITION=${arg#*=} ;; --time=*) TIME=${arg#*=} ;; --dry_run) DRY=1 ;;
    *) echo "error: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ ${#EXTRA[@]} -gt 0 ]] && EXTRA=("${EXTRA[@]:1}")
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nodes must be a positive integer, got '$NODES'" >&2; exit 2; }
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --gpus_per_node must be a positive integer, got '$GPUS'" >&2; exit 2; }
[[ -f "$CONFIG" ]] || { echo "error: --config=$CONFIG does not exist" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || { echo "error: --workdir is required (a path every node can write)" >&2; exit 2; }
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=kforcing
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
${PARTITION:+#SBATCH --partition=$PARTITION}
cd $(pwd)
# one process per GPU; jax.distributed.initialize() reads SLURM's variables
export KFORCING_DISTRIBUTED=1
srun --kill-on-bad-exit=1 python3 main.py --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
if [[ $DRY == 1 ]]; then echo "$SCRIPT"; else echo "$SCRIPT" | sbatch; fi
