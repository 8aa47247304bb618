#!/bin/bash
# ResNet-50 / ImageNet with distributed K-FAC on 128 V100s: ABCI (1.0/2.0) Grid Engine, 32 rt_F nodes.
# This is the paper's machine: 32 nodes x 4 V100 = 128 ranks, one rank per GPU, 128 images each.
#
# Submit from the repository root:
#   qsub -g GROUP scripts/abci/kfac_resnet50_128gpu.sh
#   qsub -g GROUP -v CONFIG=configs/imagenet/resnet50_kfac_bs16k_lambda0.2.yaml scripts/abci/kfac_resnet50_128gpu.sh
#   qsub -g GROUP -v CONFIG=...,EXTRA="train.epochs=1 log.dir=runs/try" scripts/abci/kfac_resnet50_128gpu.sh
#
# Knobs (environment, pass with qsub -v NAME=value,...):
#   CONFIG         experiment file (default: the lambda = 0.25 run of Table 1)
#   IMAGENET       folder holding train/ and val/ in ImageFolder layout (copy to $SGE_LOCALDIR for speed)
#   EXTRA          further section.key=value overrides for the launcher
#   VENV           virtual environment with torch, horovod (NCCL build) and this project (default .venv)
#   GPUS_PER_NODE  4 on rt_F
#   MODULES        module list; check 'module avail' on your system (names change between ABCI versions)
#   PRECISION      train.precision passed to the launcher (default fp16: V100 has no bf16, the configs'
#                  default; fp16 runs with a loss scaler, fp32 is the slow reference)
#   MAX_STEPS      stop after this many steps (train.max_steps; a short trial of the job)
#   Horovod tuning (read by Horovod at start-up; every HOROVOD_* and NCCL_* variable set is forwarded to
#   every rank with mpirun -x, scripts/job_env.sh):
#     HOROVOD_FUSION_THRESHOLD  bytes fused into one allreduce (config: horovod.fusion_threshold_mb)
#     HOROVOD_CYCLE_TIME        ms between fusion cycles (config: horovod.cycle_time_ms)
#     HOROVOD_TIMELINE          Chrome-trace file of every collective (config: horovod.timeline)
#     HOROVOD_HIERARCHICAL_ALLREDUCE=1  intra-node NCCL + inter-node MPI allreduce
#     fp16 gradient compression: EXTRA="horovod.fp16_allreduce=true" (K-FAC factors stay fp32)
#
# Software for V100 (compute capability 7.0): the default torch of 'make setup' (2.14.1, a CUDA 13.0 build)
# has kernels for sm_75 and newer only, and nvcc 13 has no compute_70. A V100 takes torch 2.14.1's CUDA
# 12.6 build (the newest torch release with sm_70 kernels; Horovod needs no patch beyond the default's for
# it), a CUDA 12.x toolkit (the cuda/12.x module below) and Horovod with NCCL for sm_70. With the modules
# loaded, from the repository root, one command (README.md, "GPU generations"):
#     TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=70 make setup
# 'make setup' keeps a torch that satisfies TORCH_SPEC (a later plain 'make setup' keeps the cu126 build)
# and replaces a Horovod of another flavour (without HOROVOD_GPU_OPERATIONS=NCCL: the cpu one). The build
# stops at once, with one line, when torch or nvcc lacks sm_70. Each rank checks at start-up that torch
# has kernels for its GPU and that Horovod was built with NCCL, and otherwise stops with one line naming
# the fix (exit code 2).
#
# Grid Engine resources: rt_F = one full node (4 V100, 40 cores); h_rt = wall-clock limit.
# A checkpoint is written every epoch and the paper configs say checkpoint.resume=auto, so
# re-submitting the same job continues from <log.dir>/checkpoints/last.pt.
#$ -l rt_F=32
#$ -l h_rt=24:00:00
#$ -j y
#$ -cwd
#$ -N kfac-r50-128

set -euo pipefail

CONFIG=${CONFIG:-configs/imagenet/resnet50_kfac_bs16k_lambda0.25.yaml}
IMAGENET=${IMAGENET:-/groups/$(id -gn)/imagenet}
EXTRA=${EXTRA:-}
VENV=${VENV:-.venv}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
MODULES=${MODULES:-"python/3.11 cuda/12.2 cudnn/8.9 nccl/2.18 openmpi/4.1"}   # CUDA 12.x: V100 (see above)
PRECISION=${PRECISION:-fp16}

if [ -f /etc/profile.d/modules.sh ]; then
  source /etc/profile.d/modules.sh
  module load $MODULES
fi
source "$VENV/bin/activate"

# $SGE_JOB_HOSTLIST names the job's nodes, one line each; the hostfile gives each GPUS_PER_NODE slots.
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/hosts.${JOB_ID:-local}.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
awk -v slots="$GPUS_PER_NODE" '!seen[$1]++ {print $1 " slots=" slots}' "$SGE_JOB_HOSTLIST" > "$HOSTFILE"
NHOSTS=$(wc -l < "$HOSTFILE")
NP=$((NHOSTS * GPUS_PER_NODE))
echo "job ${JOB_ID:-?}: $NHOSTS nodes x $GPUS_PER_NODE GPUs = $NP ranks; config $CONFIG; precision $PRECISION"
source scripts/job_env.sh

# One rank per GPU (-map-by ppr:N:node); no CPU binding so DataLoader workers spread over the cores.
# shellcheck disable=SC2086
mpirun -hostfile "$HOSTFILE" -np "$NP" -map-by ppr:"$GPUS_PER_NODE":node -bind-to none "${MPI_FORWARD[@]}" \
  python -m launch.train --config "$CONFIG" \
    data.train_dir="$IMAGENET/train" data.val_dir="$IMAGENET/val" \
    train.world_size="$NP" train.precision="$PRECISION" "${TRAIN_LIMITS[@]}" $EXTRA
