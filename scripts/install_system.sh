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
# No service may start from a package's install script: openssh-server would otherwise start a system sshd on
# every address where an init system runs; the tests start their own, on loopback only. policy-rc.d is
# Debian's switch for that, put in place only if none is there and removed afterwards.
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && own_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" || status=$?
[ -n "$own_policy" ] && $sudo rm -f "$policy"
[ "$status" -eq 0 ] || { echo "install_system: step 'apt-get install ${need[*]}' failed" >&2; exit 1; }
