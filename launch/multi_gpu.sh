#!/usr/bin/env bash
# All GPUs of one host in one process (JAX drives every local GPU; the mesh spans them).
#   launch/multi_gpu.sh --config=configs/owt.py --workdir=/data/kf_owt [--gpus=0,1,2,3]
#       [--fsdp=N] [--tensor=N] [--dry_run] [-- overrides]
# Without --fsdp/--tensor the config's own mesh is used (e.g. configs/owt_8xh100.py);
# with either, the mesh becomes data=-1 (the rest of the GPUs) x fsdp x tensor.
set -euo pipefail
CONFIG= WORKDIR= GPUS= FSDP= TENSOR= DRY=0 EXTRA=()
for arg in "$@"; do
  if [[ ${#EXTRA[@]} -gt 0 || "$arg" == "--" ]]; then EXTRA+=("$arg"); continue; fi
  case "$arg" in
    --config=*) CONFIG=${arg#*=} ;; --workdir=*) WORKDIR=${arg#*=} ;; --gpus=*) GPUS=${arg#*=} ;;
    --fsdp=*) FSDP=${arg#*=} ;; --tensor=*) TENSOR=${arg#*=} ;; --dry_run) DRY=1 ;;
    *) echo "error: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ ${#EXTRA[@]} -gt 0 ]] && EXTRA=("${EXTRA[@]:1}")
[[ -f "$CONFIG" ]] || { echo "error: --config=$CONFIG does not exist" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || { echo "error: --workdir is required" >&2; exit 2; }
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: --gpus must look like 0,1,2,3" >&2; exit 2; }
for v in FSDP TENSOR; do [[ -z "${!v}" || "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --$(echo $v | tr A-Z a-z) must be a positive integer" >&2; exit 2; }; done
MESH=()
if [[ -n "$FSDP$TENSOR" ]]; then
  MESH=(--config.mesh.data=-1 --config.mesh.fsdp="${FSDP:-1}" --config.mesh.tensor="${TENSOR:-1}")
fi
CMD=(python3 main.py --config="$CONFIG" --workdir="$WORKDIR" "${MESH[@]}" "${EXTRA[@]}")
ENVS=()
[[ -n "$GPUS" ]] && ENVS=(env CUDA_VISIBLE_DEVICES="$GPUS")
echo "+ ${ENVS[*]} ${CMD[*]}"
[[ $DRY == 1 ]] || "${ENVS[@]}" "${CMD[@]}"
