#!/bin/bash
# ResNet-50 / ImageNet with distributed K-FAC on ABCI 3.0 (PBS Professional): 16 rt_HF nodes x 8 H200 =
# 128 ranks, one rank per GPU, 128 images each: the paper's global batch of 16,384 (it ran 32 nodes x 4
# V100 on ABCI 1.0; ABCI's V100 and A100 nodes and their Grid Engine were shut down on 31 October 2024).
#
# Submit from the repository root (PBS starts the job in $HOME; the script moves to $PBS_O_WORKDIR):
#   qsub -P GROUP scripts/abci/kfac_resnet50_128gpu.sh
#   qsub -P GROUP -v CONFIG=configs/imagenet/resnet50_kfac_bs16k_lambda0.2.yaml scripts/abci/kfac_resnet50_128gpu.sh
#   qsub -P GROUP -l select=2:mpiprocs=8 -v CONFIG=...,MAX_STEPS=10 scripts/abci/kfac_resnet50_128gpu.sh
#
# The job's body is scripts/pbs/kfac_resnet50_128gpu.sh: its header lists the knobs (CONFIG, IMAGENET,
# EXTRA, VENV, GPUS_PER_NODE, MODULES, MAX_STEPS, HOROVOD_*/NCCL_*), the ABCI 3.0 module list it loads
# (python/3.12, cuda/12.x, cudnn/9.x, nccl, hpcx/2.20: the MODULES line to check against 'module avail')
# and the set-up command for H200 (compute capability 9.0) with a CUDA 12 toolkit:
#     TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 make setup
# The configs' bf16 runs on H200 as written.
#
# Resources: rt_HF = one whole node (8 H200, 2 x 48-core Xeon, 8 x NDR 200 Gb/s); select=16 nodes, each
# with mpiprocs=8, so $PBS_NODEFILE lists every node 8 times (the body checks it against GPUS_PER_NODE);
# walltime = limit. With checkpoint.resume=auto (the paper configs) a re-submitted job continues from
# <log.dir>/checkpoints/last.pt.
#PBS -q rt_HF
#PBS -l select=16:mpiprocs=8
#PBS -l walltime=12:00:00
#PBS -j oe
#PBS -N kfac-r50-128

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
exec bash scripts/pbs/kfac_resnet50_128gpu.sh
