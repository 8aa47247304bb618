#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 into the current Python environment.
#
# Horovod's last release pins C++14; PyTorch 2.14's headers need C++20, so the sdist is patched
# (CMAKE_CXX_STANDARD 14 -> 20 in CMakeLists.txt and horovod/torch/CMakeLists.txt) before building.
# The built wheel is cached outside the repository (KFAC_HVD_CACHE, default ~/.cache/kfac-hvd), keyed by
# the torch version and GPU-operation flavour, so later installs take seconds.
#
# Environment:
#   PYTHON                  interpreter of the target environment (default: python on PATH)
#   KFAC_HVD_CACHE          cache folder for the sdist, build logs and wheels
#   HOROVOD_GPU_OPERATIONS  set to NCCL on a GPU cluster (with HOROVOD_NCCL_HOME if NCCL is not in the
#                           default paths, and HOROVOD_BUILD_CUDA_CC_LIST=70|80|90 for the cluster's GPUs)
#   CUDA_HOME               CUDA toolkit folder; found from nvcc when unset
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=$(command -v "${PYTHON:-python}") || { echo "install_horovod: no python at ${PYTHON:-python}" >&2; exit 1; }
# Absolute, because the build runs inside the unpacked sdist.
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac
CACHE=${KFAC_HVD_CACHE:-$HOME/.cache/kfac-hvd}
mkdir -p "$CACHE/wheels" "$CACHE/logs"

fail() { echo "install_horovod: step '$1' failed${2:+; log: $2}" >&2; exit 1; }

# Already installed and importable with the torch extension: nothing to do.
if "$PYTHON" -c "import horovod, horovod.torch; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null; then
  echo "install_horovod: horovod $HOROVOD_VERSION already installed"
  exit 0
fi

torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])') \
  || fail "find torch (install torch before Horovod)"
flavour=${HOROVOD_GPU_OPERATIONS:-cpu}
wheel_dir="$CACHE/wheels/torch-$torch_version-$flavour"

if ! ls "$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl >/dev/null 2>&1; then
  log="$CACHE/logs/horovod-build-$torch_version-$flavour.log"
  : >"$log"
  command -v mpicxx >/dev/null || fail "find MPI (apt-get install openmpi-bin libopenmpi-dev)"
  command -v cmake >/dev/null || "$PYTHON" -m pip install -q cmake >>"$log" 2>&1 || fail "install cmake" "$log"

  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  echo "install_horovod: downloading the horovod $HOROVOD_VERSION sdist"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src" >>"$log" 2>&1 \
    || fail "download sdist" "$log"
  tar -xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src" || fail "unpack sdist"
  tree="$src/horovod-$HOROVOD_VERSION"

  echo "install_horovod: patching CMAKE_CXX_STANDARD to 20"
  for f in "$tree/CMakeLists.txt" "$tree/horovod/torch/CMakeLists.txt"; do
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$f"
    grep -q 'set(CMAKE_CXX_STANDARD 20)' "$f" || fail "patch $f"
  done

  # The torch wheel is a CUDA build, so Horovod's CMake looks for the CUDA toolkit. nvcc on PATH may be a
  # wrapper script; the toolkit is the folder whose bin/ holds the real nvcc.
  if [ -z "${CUDA_HOME:-}" ]; then
    nvcc_path=$(command -v nvcc || true)
    if [ -n "$nvcc_path" ]; then
      real=$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc_path" 2>/dev/null | head -1 || true)
      [ -n "$real" ] || real=$(readlink -f "$nvcc_path")
      CUDA_HOME=$(dirname "$(dirname "$real")")
    fi
  fi
  if [ -n "${CUDA_HOME:-}" ]; then
    export CUDA_HOME HOROVOD_CUDA_HOME="$CUDA_HOME"
    export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
  fi

  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  echo "install_horovod: building the wheel (several minutes; log: $log)"
  (cd "$tree" && "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$src/out" .) >>"$log" 2>&1 \
    || fail "build wheel" "$log"
  mkdir -p "$wheel_dir"
  cp "$src"/out/horovod-*.whl "$wheel_dir/"
fi

echo "install_horovod: installing the cached wheel from $wheel_dir"
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl \
  || fail "install wheel"
# Horovod's runtime dependencies (cloudpickle, psutil, pyyaml, packaging), without touching torch.
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging || fail "install runtime dependencies"

bindir=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
check=$("$bindir/horovodrun" --check-build) || fail "horovodrun --check-build"
echo "$check"
for want in "\[X\] PyTorch" "\[X\] MPI" "\[X\] Gloo"; do
  echo "$check" | grep -q "$want" || fail "check-build: missing $want"
done
