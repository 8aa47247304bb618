#!/usr/bin/env bash
# Debian packages the project needs: MPI (for Horovod's MPI controller and mpi4py) and real data.
set -euo pipefail
need=()
for pkg in openmpi-bin libopenmpi-dev dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
