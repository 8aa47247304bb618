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
#   Horovod tuning (read by Horovod at start-up; mpirun forwards them with -x below):
#     HOROVOD_FUSION_THRESHOLD  bytes fused into one allreduce (config: horovod.fusion_threshold_mb)
#     HOROVOD_CYCLE_TIME        ms between fusion cycles (config: horovod.cycle_time_ms)
#     HOROVOD_TIMELINE          Chrome-trace file of every collective (config: horovod.timeline)
#     HOROVOD_HIERARCHICAL_ALLREDUCE=1  intra-node NCCL + inter-node MPI allreduce
#     fp16 gradient compression: EXTRA="horovod.fp16_allreduce=true" (K-FAC factors stay fp32)
#   Build Horovod for the cluster with HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=70
#   (scripts/install_horovod.sh); the torch build must support sm_70 (V100).
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
MODULES=${MODULES:-"python/3.11 cuda/12.2 cudnn/8.9 nccl/2.18 openmpi/4.1"}

if [ -f /etc/profile.d/modules.sh ]; then
  source /etc/profile.d/modules.sh
  module load $MODULES
fi
source "$VENV/bin/activate"

NHOSTS=${NHOSTS:-1}
NP=$((NHOSTS * GPUS_PER_NODE))
echo "job ${JOB_ID:-?}: $NHOSTS nodes x $GPUS_PER_NODE GPUs = $NP ranks; config $CONFIG"

# One rank per GPU (-map-by ppr:4:node); no CPU binding so DataLoader workers spread over the cores.
# -x forwards the environment each rank needs.
mpirun -hostfile "$SGE_JOB_HOSTLIST" -np "$NP" -map-by ppr:"$GPUS_PER_NODE":node -bind-to none \
  -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH \
  -x NCCL_DEBUG=${NCCL_DEBUG:-WARN} \
  ${HOROVOD_FUSION_THRESHOLD:+-x HOROVOD_FUSION_THRESHOLD} \
  ${HOROVOD_CYCLE_TIME:+-x HOROVOD_CYCLE_TIME} \
  ${HOROVOD_TIMELINE:+-x HOROVOD_TIMELINE} \
  ${HOROVOD_HIERARCHICAL_ALLREDUCE:+-x HOROVOD_HIERARCHICAL_ALLREDUCE} \
  python -m launch.train --config "$CONFIG" \
    data.train_dir="$IMAGENET/train" data.val_dir="$IMAGENET/val" \
    train.world_size="$NP" $EXTRA
