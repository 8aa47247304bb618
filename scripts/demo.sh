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
#   ENGINE    horovod (default: horovodrun --gloo) or torch (torchrun, train.engine=torch; no Horovod)
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

ENGINE=${ENGINE:-horovod}

case "$ENGINE" in
  horovod) LAUNCHER="$BIN/horovodrun"; LAUNCH=("$LAUNCHER" -np "$NP" --gloo -H "localhost:$NP" "$PYTHON") ;;
  # One node; the rendezvous on the loopback address, at a port the system picks (--master-port 0 is not
  # allowed with the static rendezvous, so ask Python for a free one).
  torch) LAUNCHER="$BIN/torchrun"
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    LAUNCH=("$LAUNCHER" --nnodes 1 --nproc-per-node "$NP" --master-addr 127.0.0.1 --master-port "$PORT") ;;
  *) echo "demo: ENGINE is '$ENGINE'; use horovod or torch" >&2; exit 1 ;;
esac
[ -x "$LAUNCHER" ] || { echo "demo: $LAUNCHER not found; run 'make setup ENGINE=$ENGINE' first" >&2; exit 1; }
rm -rf "$RUN_DIR"
echo "demo: $NP ranks ($(basename "$LAUNCHER"), train.engine=$ENGINE), $CONFIG -> $RUN_DIR"
start=$(date +%s)
# OMP_NUM_THREADS=1: one compute thread per rank, so that the ranks share the cores without contention.
OMP_NUM_THREADS=1 "${LAUNCH[@]}" \
  -m launch.train --config "$CONFIG" log.dir="$RUN_DIR" train.world_size="$NP" train.engine="$ENGINE" \
  checkpoint.resume=null "$@"
end=$(date +%s)
echo
echo "demo finished in $((end - start)) s (including start-up); outputs in $RUN_DIR"
"$PYTHON" -m launch.report "$RUN_DIR" --plot
