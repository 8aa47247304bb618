#!/bin/bash
# ResNet-50 / ImageNet with distributed K-FAC under PBS Professional, with ABCI 3.0's defaults: 16 nodes
# x 8 H200 = 128 ranks, one rank per GPU, 128 images each (the paper's 128 x 128 = 16,384 on newer GPUs).
# On ABCI 3.0 submit scripts/abci/kfac_resnet50_128gpu.sh (its queue and resources; it runs this script).
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
#   GPUS_PER_NODE  ranks per node (8 on ABCI 3.0's rt_HF); must equal the select statement's mpiprocs
#   MODULES        module list (default: ABCI 3.0's; check 'module avail' on your system)
#   MAX_STEPS      stop after this many steps (train.max_steps; a short trial of the job)
#   Horovod tuning (environment: every HOROVOD_* and NCCL_* variable set is forwarded to every rank with
#   mpirun -x, scripts/job_env.sh; or the config's horovod section):
#     HOROVOD_FUSION_THRESHOLD, HOROVOD_CYCLE_TIME, HOROVOD_TIMELINE, HOROVOD_HIERARCHICAL_ALLREDUCE;
#     fp16 gradient compression: EXTRA="horovod.fp16_allreduce=true"
#
# Software for H200/H100 (compute capability 9.0) with a CUDA 12.x toolkit loaded (ABCI 3.0 has CUDA 12
# modules): torch 2.14.1's CUDA 12.6 build (it has sm_90 kernels) and Horovod with NCCL for sm_90:
#     TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 make setup
# With a CUDA 13 toolkit loaded instead, the default torch (cu130) fits:
#     HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 make setup
# ('make setup' replaces a Horovod of another flavour in the venv.) On V100 nodes (7.0; no sm_70 kernels in
# the cu130 torch, no compute_70 in nvcc 13) take the CUDA 12.6 build with a CUDA 12.x toolkit loaded,
# with one command (README.md, "GPU generations"), and EXTRA="train.precision=fp16" (V100 has no bf16):
#     TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=70 make setup
# The configs' bf16 autocast, channels_last and cuDNN benchmark fit H200. Each rank checks at start-up that
# torch has kernels for its GPU and that Horovod was built with NCCL, and otherwise stops with one line
# naming the fix (exit code 2).
#
# PBS resources: select=16 chunks of mpiprocs=8 (one chunk per node on rt_HF); walltime = limit.
# $PBS_NODEFILE lists each node once per MPI process (mpiprocs times): the script checks that every node
# is listed GPUS_PER_NODE times, so a select without mpiprocs (one line per node) stops with one line
# instead of running one rank per node. With checkpoint.resume=auto (the paper configs) a re-submitted job
# continues from last.pt.
#PBS -q rt_HF
#PBS -l select=16:mpiprocs=8
#PBS -l walltime=12:00:00
#PBS -j oe
#PBS -N kfac-r50-128

set -euo pipefail
# PBS starts the job in $HOME; qsub was run from the repository root.
cd "${PBS_O_WORKDIR:-.}"

CONFIG=${CONFIG:-configs/imagenet/resnet50_kfac_bs16k_lambda0.25.yaml}
IMAGENET=${IMAGENET:-/groups/$(id -gn)/imagenet}
EXTRA=${EXTRA:-}
VENV=${VENV:-.venv}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# ABCI 3.0 module names (assumed versions: the line to edit after 'module avail'). No python/3.11,
# openmpi or cuDNN 8 there; hpcx brings Open MPI 4.1.
MODULES=${MODULES:-"python/3.12/3.12.9 cuda/12.6/12.6.1 cudnn/9.5/9.5.1 nccl/2.23/2.23.4-1 hpcx/2.20"}

if [ -f /etc/profile.d/modules.sh ]; then
  source /etc/profile.d/modules.sh
  # shellcheck disable=SC2086
  module load $MODULES
else
  echo "no /etc/profile.d/modules.sh: MODULES not loaded ($MODULES)" >&2
fi
source "$VENV/bin/activate"

# The hostfile names each node once, with GPUS_PER_NODE slots, in $PBS_NODEFILE's order.
COUNTS=$(awk '!n[$1]++ {order[++k] = $1} END {for (i = 1; i <= k; i++) print order[i], n[order[i]]}' "$PBS_NODEFILE")
MISMATCH=$(awk -v want="$GPUS_PER_NODE" '$2 != want {print "node " $1 " " $2 " time(s)"; exit}' <<< "$COUNTS")
if [ -n "$MISMATCH" ]; then
  echo "$0: \$PBS_NODEFILE lists $MISMATCH, not GPUS_PER_NODE=$GPUS_PER_NODE: submit with -l select=N:mpiprocs=$GPUS_PER_NODE (PBS lists each node once per MPI process)" >&2
  exit 2
fi
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/hosts.${PBS_JOBID:-local}.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
awk -v slots="$GPUS_PER_NODE" '{print $1 " slots=" slots}' <<< "$COUNTS" > "$HOSTFILE"
NODES=$(wc -l < "$HOSTFILE")
NP=$((NODES * GPUS_PER_NODE))
echo "job ${PBS_JOBID:-?}: $NODES nodes x $GPUS_PER_NODE GPUs = $NP ranks; config $CONFIG"
source scripts/job_env.sh

# One rank per GPU (-map-by ppr:N:node); no CPU binding so DataLoader workers spread over the cores.
# shellcheck disable=SC2086
mpirun -hostfile "$HOSTFILE" -np "$NP" -map-by ppr:"$GPUS_PER_NODE":node -bind-to none "${MPI_FORWARD[@]}" \
  python -m launch.train --config "$CONFIG" \
    data.train_dir="$IMAGENET/train" data.val_dir="$IMAGENET/val" \
    train.world_size="$NP" "${TRAIN_LIMITS[@]}" $EXTRA
