#!/bin/bash
# The SGD reference at the same scale on ABCI 3.0 (16 rt_HF nodes x 8 H200 = 128 ranks, mini-batch
# 16,384): the K-FAC job with the SGD config. Knobs as in scripts/pbs/kfac_resnet50_128gpu.sh.
#   qsub -P GROUP scripts/abci/sgd_resnet50_128gpu.sh
#PBS -q rt_HF
#PBS -l select=16:mpiprocs=8
#PBS -l walltime=12:00:00
#PBS -j oe
#PBS -N sgd-r50-128

set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
export CONFIG=${CONFIG:-configs/imagenet/resnet50_sgd_bs16k.yaml}
exec bash scripts/abci/kfac_resnet50_128gpu.sh
