#!/usr/bin/env bash
# Run kforcing_jax on every worker of a Cloud TPU VM (pod slice).
#   launch/tpu_vm.sh --name=kf-v4-8 --zone=us-central2-b --accelerator=v4-8 \
#       --config=configs/owt.py --workdir=gs://BUCKET/kf_owt [--version=tpu-ubuntu2204-base] \
#       [--create] [--dry_run] [-- --config.stages.teacher.steps=1000 ...]
# Creates the TPU VM when --create is given (else reuses it), copies this checkout to every
# worker, installs requirements with jax[tpu], and starts main.py on all workers at once;
# JAX detects the TPU pod topology itself (KFORCING_DISTRIBUTED=1).
set -euo pipefail
NAME= ZONE= ACCEL= CONFIG= WORKDIR= VERSION=tpu-ubuntu2204-base CREATE=0 DRY=0 EXTRA=()
for arg in "$@"; do
  if [[ ${#EXTRA[@]} -gt 0 || "$arg" == "--" ]]; then EXTRA+=("$arg"); continue; fi
  case "$arg" in
    --name=*) NAME=${arg#*=} ;; --zone=*) ZONE=${arg#*=} ;; --accelerator=*) ACCEL=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;; --workdir=*) WORKDIR=${arg#*=} ;;
    --version=*) VERSION=${arg#*=} ;; --create) CREATE=1 ;; --dry_run) DRY=1 ;;
    *) echo "error: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ ${#EXTRA[@]} -gt 0 ]] && EXTRA=("${EXTRA[@]:1}")
for v in NAME ZONE ACCEL CONFIG WORKDIR; do
  [[ -n "${!v}" ]] || { echo "error: --$(echo $v | tr A-Z a-z | sed 's/accel/accelerator/') is required" >&2; exit 2; }
done
[[ -f "$CONFIG" ]] || { echo "error: --config=$CONFIG does not exist" >&2; exit 2; }
[[ "$ACCEL" =~ ^v[2-6][a-z]*-[0-9]+$ ]] || { echo "error: --accelerator=$ACCEL is not a TPU type like v4-8 or v5p-16" >&2; exit 2; }
REMOTE_DIR=kforcing_jax
run() { echo "+ $*"; [[ $DRY == 1 ]] || "$@"; }
if [[ $CREATE == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" --version="$VERSION"
fi
run gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" "$(pwd)" "$NAME:~/$REMOTE_DIR"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command \
  "cd ~/$REMOTE_DIR && pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command \
  "cd ~/$REMOTE_DIR && KFORCING_DISTRIBUTED=1 python3 main.py --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
