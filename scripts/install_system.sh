#!/usr/bin/env bash
# Debian packages the project needs: MPI (for Horovod's MPI controller and mpi4py), the tools that build
# Horovod (a C++ compiler, make, cmake 3.x), real data, and an sshd for the tests' two loopback hosts.
set -euo pipefail
need=()
for pkg in openmpi-bin libopenmpi-dev g++ make cmake dataset-fashion-mnist openssh-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
echo "install_system: installing ${need[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq || { echo "install_system: step 'apt-get update' failed" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" \
  || { echo "install_system: step 'apt-get install ${need[*]}' failed" >&2; exit 1; }
