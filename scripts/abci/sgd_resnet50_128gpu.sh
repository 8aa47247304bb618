#!/bin/bash
# The SGD reference at the same scale (128 V100, mini-batch 16,384): the K-FAC job script with the SGD
# config. Knobs as in kfac_resnet50_128gpu.sh.
#   qsub -g GROUP scripts/abci/sgd_resnet50_128gpu.sh
#$ -l rt_F=32
#$ -l h_rt=24:00:00
#$ -j y
#$ -cwd
#$ -N sgd-r50-128
set -euo pipefail
export CONFIG=${CONFIG:-configs/imagenet/resnet50_sgd_bs16k.yaml}
exec bash scripts/abci/kfac_resnet50_128gpu.sh
