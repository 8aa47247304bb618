#!/usr/bin/env bash
# make demo: distributed K-FAC with the per-layer adaptive factor-update interval (lambda = 0.25) on
# Fashion-MNIST (real data, Debian's dataset-fashion-mnist), a small ResNet, 2 ranks under
# horovodrun --gloo on this machine's CPUs. A few minutes; ends with a table (test top-1, Fisher
# traffic per rank against updating every factor on every step, wall time) and the run's figure,
# RUN_DIR/report.png (python -m launch.report RUN_DIR --plot).
#
# Environment:
#   NP        ranks (default 2)
#   CONFIG    experiment file (default configs/fashion_mnist/small_resnet_kfac_lambda0.25.yaml)
#   RUN_DIR   output folder (default runs/demo; replaced on every run)
#   PYTHON    interpreter of the project's environment (default .venv/bin/python)
# Further arguments are passed to the launcher as overrides, e.g. scripts/demo.sh train.epochs=1
# Progress: under horovodrun rank 0 prints a plain line every log.progress_every_s seconds (default 30;
# scripts/demo.sh log.progress_every_s=10 for more).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
NP=${NP:-2}
CONFIG=${CONFIG:-configs/fashion_mnist/small_resnet_kfac_lambda0.25.yaml}
RUN_DIR=${RUN_DIR:-runs/demo}

[ -x "$BIN/horovodrun" ] || { echo "demo: $BIN/horovodrun not found; run 'make setup' first" >&2; exit 1; }
rm -rf "$RUN_DIR"
echo "demo: $NP ranks (horovodrun --gloo), $CONFIG -> $RUN_DIR"
start=$(date +%s)
# OMP_NUM_THREADS=1: one compute thread per rank, so that the ranks share the cores without contention.
OMP_NUM_THREADS=1 "$BIN/horovodrun" -np "$NP" --gloo -H "localhost:$NP" \
  "$PYTHON" -m launch.train --config "$CONFIG" log.dir="$RUN_DIR" train.world_size="$NP" \
  checkpoint.resume=null "$@"
end=$(date +%s)
echo
echo "demo finished in $((end - start)) s (including start-up); outputs in $RUN_DIR"
"$PYTHON" -m launch.report "$RUN_DIR" --plot
