#!/bin/bash
# ResNet-50 / ImageNet with distributed K-FAC on ABCI 3.0 (PBS Professional): 16 rt_HF nodes x 8 H200
# = 128 ranks, one rank per GPU, 128 images each (the paper's 128 x 128 = 16,384 on newer GPUs).
#
# Submit from the repository root:
#   qsub -P GROUP scripts/pbs/kfac_resnet50_128gpu.sh
#   qsub -P GROUP -v CONFIG=configs/imagenet/resnet50_kfac_bs16k_baseline.yaml scripts/pbs/kfac_resnet50_128gpu.sh
#
# Knobs (environment, pass with qsub -v NAME=value,...):
#   CONFIG         experiment file (default: the lambda = 0.25 run of Table 1)
#   IMAGENET       folder holding train/ and val/ in ImageFolder layout
#   EXTRA          further section.key=value overrides for the launcher (quoted, space-separated)
#   VENV           virtual environment with torch, horovod (NCCL build) and this project (default .venv)
#   GPUS_PER_NODE  8 on rt_HF
#   MODULES        module list; check 'module avail' (ABCI 3.0 provides hpcx for MPI)
#   MAX_STEPS      stop after this many steps (train.max_steps; a short trial of the job)
#   Horovod tuning (environment: every HOROVOD_* and NCCL_* variable set is forwarded to every rank with
#   mpirun -x, scripts/job_env.sh; or the config's horovod section):
#     HOROVOD_FUSION_THRESHOLD, HOROVOD_CYCLE_TIME, HOROVOD_TIMELINE, HOROVOD_HIERARCHICAL_ALLREDUCE;
#     fp16 gradient compression: EXTRA="horovod.fp16_allreduce=true"
#
# Software for H200 (compute capability 9.0): the torch==2.14.1 CUDA 13.0 wheel of 'make setup' has sm_90
# kernels; load a CUDA 13 toolkit (nvcc) and build Horovod with NCCL for sm_90:
#     HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 make setup
# ('make setup' replaces a Horovod of another flavour in the venv.) On V100 nodes (7.0; no sm_70 kernels in
# that torch, no compute_70 in nvcc 13) take torch 2.14.1's CUDA 12.6 build with a CUDA 12.x toolkit loaded,
# with one command (README.md, "GPU generations"), and EXTRA="train.precision=fp16" (V100 has no bf16):
#     TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=70 make setup
# The configs' bf16 autocast, channels_last and cuDNN benchmark fit H200. Each rank checks at start-up that
# torch has kernels for its GPU and that Horovod was built with NCCL, and otherwise stops with one line
# naming the fix (exit code 2).
#
# PBS resources: -q rt_HF = full H200 nodes; select=16 chunks (one per node); walltime = limit.
# $PBS_NODEFILE lists the nodes (one line per chunk); -map-by ppr:8:node places 8 ranks on each.
# With checkpoint.resume=auto (the paper configs) a re-submitted job continues from last.pt.
#PBS -q rt_HF
#PBS -l select=16
#PBS -l walltime=12:00:00
#PBS -j oe
#PBS -N kfac-r50-128

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"

CONFIG=${CONFIG:-configs/imagenet/resnet50_kfac_bs16k_lambda0.25.yaml}
IMAGENET=${IMAGENET:-/groups/$(id -gn)/imagenet}
EXTRA=${EXTRA:-}
VENV=${VENV:-.venv}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MODULES=${MODULES:-"python/3.11 cuda/13.0 cudnn nccl hpcx"}   # a CUDA 13 toolkit for the cu130 torch

if [ -f /etc/profile.d/modules.sh ]; then
  source /etc/profile.d/modules.sh
  module load $MODULES
fi
source "$VENV/bin/activate"

# $PBS_NODEFILE has a line per chunk (per MPI process with mpiprocs=N), in order; the hostfile names each
# node once, with GPUS_PER_NODE slots.
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/hosts.${PBS_JOBID:-local}.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
awk -v slots="$GPUS_PER_NODE" '!seen[$1]++ {print $1 " slots=" slots}' "$PBS_NODEFILE" > "$HOSTFILE"
NODES=$(wc -l < "$HOSTFILE")
NP=$((NODES * GPUS_PER_NODE))
echo "job ${PBS_JOBID:-?}: $NODES nodes x $GPUS_PER_NODE GPUs = $NP ranks; config $CONFIG"
source scripts/job_env.sh

# shellcheck disable=SC2086
mpirun -hostfile "$HOSTFILE" -np "$NP" -map-by ppr:"$GPUS_PER_NODE":node -bind-to none "${MPI_FORWARD[@]}" \
  python -m launch.train --config "$CONFIG" \
    data.train_dir="$IMAGENET/train" data.val_dir="$IMAGENET/val" \
    train.world_size="$NP" "${TRAIN_LIMITS[@]}" $EXTRA
