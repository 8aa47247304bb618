#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 into a Python environment, in one of two flavours:
#   cpu   (default)                  PyTorch + Gloo + MPI; CUDA tensors are not reduced by Horovod
#   NCCL  (HOROVOD_GPU_OPERATIONS=NCCL)  the same plus NCCL for CUDA tensors
#
# Horovod's last release pins C++14; PyTorch >= 2.1 needs C++17 and 2.14's headers need C++20, so the
# sdist is patched (CMAKE_CXX_STANDARD 14 -> 20 in CMakeLists.txt and horovod/torch/CMakeLists.txt)
# before building. The wheel is cached outside the repository, per torch version, torch build
# (torch.version.cuda: cu130, cu126, ...; cpu for a CPU-only torch) and flavour
# ($KFAC_HVD_CACHE/wheels/torch-<version>+<build>-<cpu|NCCL>[-nompi]/), so later installs take seconds and
# a wheel built against one CUDA build of torch is never installed next to another. A wheel cached under
# the older key without the build (torch-<version>-<flavour>[-nompi]/) is taken over (copied to the new
# key) when the CUDA runtime it links (libcudart.so.<major>, or none) is the one of the installed torch
# (scripts/cuda_build.py answers that and does the architecture check below).
# The script is idempotent: when the asked-for flavour is already installed it exits at once; when
# another flavour (or version, or a broken build) is installed it reinstalls from the cache or builds.
#
# A wheel is checked twice: its zip must hold the extension at horovod/torch/mpi_lib_v2*.so (before it is
# cached, and before a cached one is installed), and once installed, horovod.torch must report the
# controllers and operations of the flavour (gloo_built, mpi_built where MPI is built in, nccl_built for
# NCCL). A cached wheel failing either check is moved aside to $KFAC_HVD_CACHE/wheels/set-aside/ (never
# deleted) with one line, and the build runs again.
#
# The build tree lives in $KFAC_HVD_CACHE/build/<key without '+'>.XXXXXX. Horovod's CMake derives each
# library's output folder by using the source folder's path as a regular expression
# (cmake/Utilities.cmake, SET_OUTPUT_DIR), so a '+' in that path once put the extension under the build
# folder's absolute path inside the wheel; the sdist is patched to compare the path literally
# (file(RELATIVE_PATH)), which makes any folder safe for that step. A cache folder whose path holds
# characters other than letters, digits and . _ + - / (a space, say) builds in a fresh folder under
# $TMPDIR (or /tmp) instead, since the build's own makefiles are not proofed against them.
# The NCCL flavour builds without a GPU: it needs the CUDA toolkit (nvcc) and NCCL, which it takes from
# the NCCL wheel next to torch (site-packages/nvidia/*/{include/nccl.h,lib/libnccl.so.2}). Before it
# builds, it checks that every HOROVOD_BUILD_CUDA_CC_LIST entry is a GPU the installed torch has kernels
# for (torch.cuda.get_arch_list()) and one the nvcc found can compile for (nvcc --list-gpu-arch), and
# that both are of one CUDA major version; otherwise it stops with one line naming the mismatch (V100 =
# 70 with a cu130 torch or nvcc 13, for instance).
#
# On a GPU machine without internet (system python3 with torch and nvidia-nccl-cu13, nvcc, cmake),
# from the repository root, with the sdist brought along in .gpu_carry/ (`make horovod-sdist`):
#   HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 PYTHON=python3 KFAC_HVD_PIP_ARGS=--break-system-packages bash scripts/install_horovod.sh
# (drop KFAC_HVD_PIP_ARGS where pip may install into that python; MPI is built in only if mpicxx is found.)
#
# Usage: install_horovod.sh [--dry-run] [--rebuild] [--download-sdist DIR]
#   --dry-run                prints the decision (skip, install-cached, build), the flavour, the cache
#                            and the build environment, and changes nothing (also KFAC_HVD_DRY_RUN=1)
#   --rebuild                builds from the sdist even when the flavour is installed or a wheel is
#                            cached (also KFAC_HVD_REBUILD=1; CI does this in an empty cache)
#   --download-sdist DIR     only puts the verified Horovod sdist into DIR (needs the network)
#
# Environment:
#   PYTHON                      interpreter of the target environment (default: python, else python3)
#   HOROVOD_GPU_OPERATIONS      unset for the cpu flavour, NCCL for the NCCL flavour
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures of the NCCL flavour: 90 H100/H200 (default), 80 A100,
#                               70 V100 (needs a CUDA 12.x torch and toolkit; README.md, "GPU generations")
#   HOROVOD_SDIST               a local horovod-0.28.1.tar.gz; otherwise .gpu_carry/ of this repository,
#                               then the cache, then a download from PyPI
#   KFAC_HVD_CACHE              cache folder for sdist, logs and wheels (default ~/.cache/kfac-hvd)
#   KFAC_HVD_BUILD_DIR          folder for the build tree (default $KFAC_HVD_CACHE/build); letters,
#                               digits and . _ + - / only
#   KFAC_HVD_REQUIRE_MPI=1      fail when MPI cannot be built in (default: MPI only if mpicxx is found;
#                               HOROVOD_WITHOUT_MPI=1 leaves it out)
#   MPICXX                      the MPI C++ compiler wrapper looked for (default mpicxx)
#   KFAC_HVD_PIP_ARGS           extra arguments of every pip install (e.g. --break-system-packages, --user)
#   KFAC_HVD_TARGET             install into this folder (pip --target) instead of site-packages
#   KFAC_HVD_BUILD_JOBS         parallel compile jobs (default: nproc)
#   CUDA_HOME                   CUDA toolkit folder; found from nvcc (a wrapper script is followed)
#   HOROVOD_NCCL_HOME / HOROVOD_NCCL_INCLUDE / HOROVOD_NCCL_LIB   a NCCL of your own instead of the wheel's
#   HOROVOD_CMAKE               the cmake to use; otherwise the first cmake >= 3.13 on PATH or next to
#                               PYTHON, else pip installs cmake<4 there
set -euo pipefail

HOROVOD_VERSION=0.28.1
# PyPI's sha256 of horovod-0.28.1.tar.gz: a local or carried sdist must be the released one.
SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
SDIST_NAME=horovod-$HOROVOD_VERSION.tar.gz
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "install_horovod: $*"; }
fail() { echo "install_horovod: step '$1' failed${2:+; log: $2}" >&2; exit 1; }

dry_run=${KFAC_HVD_DRY_RUN:-0}
rebuild=${KFAC_HVD_REBUILD:-0}
download_to=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --rebuild) rebuild=1 ;;
    --download-sdist) download_to=${2:?--download-sdist needs a folder}; shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_horovod: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$dry_run" = 1 ] || dry_run=0
[ "$rebuild" = 1 ] || rebuild=0

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  command -v python >/dev/null 2>&1 || PYTHON=python3
fi
PYTHON=$(command -v "$PYTHON") || fail "find python ($PYTHON)"
# Absolute, because the build runs inside the unpacked sdist.
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac

pip_args=()
# Word splitting is wanted: KFAC_HVD_PIP_ARGS holds several pip options.
# shellcheck disable=SC2206
[ -z "${KFAC_HVD_PIP_ARGS:-}" ] || pip_args=($KFAC_HVD_PIP_ARGS)
target=${KFAC_HVD_TARGET:-}
if [ -n "$target" ]; then
  mkdir -p "$target"
  target=$(cd "$target" && pwd)
  # Everything below (checks, horovodrun) must see what was installed there.
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
  pip_args+=(--target "$target" --upgrade)
fi
pip_install() { "$PYTHON" -m pip install -q ${pip_args[@]+"${pip_args[@]}"} "$@"; }

sha256_of() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
verify_sdist() {
  [ -f "$1" ] || fail "find sdist $1"
  [ "$(sha256_of "$1")" = "$SDIST_SHA256" ] || fail "verify sdist $1 (sha256 is not the one of PyPI's $SDIST_NAME)"
}
download_sdist() {  # $1: folder, $2: log
  mkdir -p "$1"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$1" >>"$2" 2>&1 \
    || fail "download sdist" "$2"
  verify_sdist "$1/$SDIST_NAME"
}

CACHE=${KFAC_HVD_CACHE:-$HOME/.cache/kfac-hvd}
mkdir -p "$CACHE/wheels" "$CACHE/logs" "$CACHE/sdist" || fail "create cache folder $CACHE"
# Absolute, because the build runs inside the unpacked sdist.
CACHE=$(cd "$CACHE" && pwd)

if [ -n "$download_to" ]; then
  log="$CACHE/logs/horovod-sdist.log"
  : >"$log"
  if [ -f "$download_to/$SDIST_NAME" ]; then
    verify_sdist "$download_to/$SDIST_NAME"
  else
    download_sdist "$download_to" "$log"
  fi
  say "sdist ready: $(cd "$download_to" && pwd)/$SDIST_NAME"
  exit 0
fi

flavour=${HOROVOD_GPU_OPERATIONS:-cpu}
case "$flavour" in
  cpu|NCCL) ;;
  *) fail "choose flavour (HOROVOD_GPU_OPERATIONS='$flavour'; this script builds '' (cpu) or NCCL)" ;;
esac

# One interpreter start answers everything about the target environment (importing torch is the slow part);
# asked again after an install, to see what horovod.torch reports.
probe_env() {
  probe=$("$PYTHON" - "$HOROVOD_VERSION" 2>/dev/null <<'EOF'
import sys, sysconfig
print("pytag=cp%d%d" % sys.version_info[:2])
print("scripts=" + sysconfig.get_path("scripts"))
try:
    import torch
except Exception as exc:
    print("torch_error=%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
    sys.exit(0)
print("torch=" + torch.__version__.split("+")[0])
print("torch_full=" + torch.__version__)
version_info = getattr(torch, "version", None)
print("torch_cuda=" + (getattr(version_info, "cuda", None) or ""))
print("torch_hip=" + ".".join((getattr(version_info, "hip", None) or "").split(".")[:2]))
try:
    import horovod
except Exception as exc:
    absent = isinstance(exc, ModuleNotFoundError) and exc.name == "horovod"
    print("horovod=absent" if absent else "horovod=broken")
    print("horovod_error=%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
    sys.exit(0)
version = getattr(horovod, "__version__", "unknown")
if version != sys.argv[1]:
    print("horovod=version-" + version)
    sys.exit(0)
try:
    import horovod.torch as hvd
    state = (int(hvd.nccl_built()), int(bool(hvd.mpi_built())), int(bool(hvd.gloo_built())))
except Exception as exc:
    print("horovod=broken")
    print("horovod_error=%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
    sys.exit(0)
print("horovod=ok")
print("nccl_built=%d\nmpi_built=%d\ngloo_built=%d" % state)
EOF
  ) || fail "probe $PYTHON"
}
probe_env
pv() { printf '%s\n' "$probe" | sed -n "s/^$1=//p" | head -1; }
torch_version=$(pv torch)
[ -n "$torch_version" ] || fail "find torch in $PYTHON ($(pv torch_error); install torch before Horovod)"
pytag=$(pv pytag)
scripts_dir=$(pv scripts)
[ -z "$target" ] || scripts_dir="$target/bin"

# MPI: on when asked for or when an MPI compiler is there; a machine with only mpi4py gets Gloo alone.
mpicxx=$(command -v "${MPICXX:-mpicxx}" 2>/dev/null || true)
if [ "${HOROVOD_WITHOUT_MPI:-0}" = 1 ]; then
  [ "${KFAC_HVD_REQUIRE_MPI:-0}" != 1 ] || fail "choose MPI (KFAC_HVD_REQUIRE_MPI=1 contradicts HOROVOD_WITHOUT_MPI=1)"
  want_mpi=0
elif [ -n "$mpicxx" ] || [ "${KFAC_HVD_REQUIRE_MPI:-0}" = 1 ]; then
  want_mpi=1
else
  want_mpi=0
fi

# Which build of torch: its C++ extension links torch's CUDA runtime, so each build gets its own wheel.
torch_cuda=$(pv torch_cuda)
if [ -n "$torch_cuda" ]; then
  torch_build="cu${torch_cuda//./}"
elif [ -n "$(pv torch_hip)" ]; then
  torch_build="rocm$(pv torch_hip)"
else
  torch_build=cpu
fi
key="torch-$torch_version+$torch_build-$flavour"
# The key of wheels cached before the build was part of it.
legacy_key="torch-$torch_version-$flavour"
# A wheel without MPI must never stand in for one with it.
if [ "$want_mpi" != 1 ]; then key="$key-nompi"; legacy_key="$legacy_key-nompi"; fi
wheel_dir="$CACHE/wheels/$key"
build_log="$CACHE/logs/horovod-build-$key.log"
install_log="$CACHE/logs/horovod-install-$key.log"

# What is installed now, and does it match the request? Sets installed, installed_flavour and reason (empty
# when it matches).
read_installed() {
  installed=$(pv horovod)
  installed_flavour=""
  reason=""
  case "$installed" in
    ok)
      if [ "$(pv nccl_built)" != 0 ]; then installed_flavour=NCCL; else installed_flavour=cpu; fi
      if [ "$installed_flavour" != "$flavour" ]; then
        reason="installed horovod $HOROVOD_VERSION is the $installed_flavour flavour"
      elif [ "$(pv gloo_built)" != 1 ]; then
        reason="installed horovod $HOROVOD_VERSION lacks Gloo"
      elif [ "$want_mpi" = 1 ] && [ "$(pv mpi_built)" != 1 ]; then
        reason="installed horovod $HOROVOD_VERSION lacks MPI"
      fi ;;
    absent) reason="horovod is not installed" ;;
    broken) reason="installed horovod does not import ($(pv horovod_error))" ;;
    version-*) reason="installed horovod is ${installed#version-}" ;;
    *) reason="horovod state unknown" ;;
  esac
}
read_installed

cached_wheel() { ls "$1"/horovod-"$HOROVOD_VERSION"-"$pytag"-*.whl 2>/dev/null | head -1 || true; }
# Copy then rename, so that a concurrent install never sees half a wheel.
put_in_cache() {
  mkdir -p "$(dirname "$2")"
  cp "$1" "$(dirname "$2")/.$(basename "$2").part" || fail "copy $1 to $(dirname "$2")"
  mv "$(dirname "$2")/.$(basename "$2").part" "$2"
}
# A wheel is moved aside, never deleted: what went wrong in it can still be looked at.
set_aside() {  # $1: wheel, $2: what is wrong with it
  local dest
  dest="$CACHE/wheels/set-aside/$key.$(date +%Y%m%d-%H%M%S).$$"
  mkdir -p "$dest" && mv "$1" "$dest/" || fail "set aside $1"
  say "wheel $1 fails its check ($2); moved to $dest/"
}
# One line naming what is wrong with a wheel's layout, or nothing.
wheel_problem() { "$PYTHON" "$REPO/scripts/horovod_wheel.py" "$1" || echo "scripts/horovod_wheel.py could not read it"; }

wheel=$(cached_wheel "$wheel_dir")
adopt_from=""
if [ -n "$reason" ] && [ -z "$wheel" ]; then
  legacy=$(cached_wheel "$CACHE/wheels/$legacy_key")
  if [ -n "$legacy" ] && [ "$("$PYTHON" "$REPO/scripts/cuda_build.py" wheel-cuda "$legacy")" = "${torch_cuda%%.*}" ]; then
    adopt_from=$legacy
    wheel="$wheel_dir/$(basename "$legacy")"
  fi
fi
wheel_check=none
if [ "$rebuild" = 1 ]; then
  reason="a rebuild from the sdist was asked for${reason:+ ($reason)}"
  wheel=""
  adopt_from=""
elif [ -n "$reason" ] && [ -n "$wheel" ]; then
  cached=${adopt_from:-$wheel}
  wheel_check=$(wheel_problem "$cached")
  if [ -n "$wheel_check" ]; then
    reason="$reason; the cached wheel $cached fails its check ($wheel_check)"
    [ "$dry_run" = 1 ] || set_aside "$cached" "$wheel_check"
    wheel=""
    adopt_from=""
  else
    wheel_check=ok
  fi
fi
if [ -z "$reason" ]; then
  decision=skip
elif [ -n "$wheel" ]; then
  decision=install-cached
else
  decision=build
fi

if [ "$dry_run" = 1 ]; then
  echo "decision: $decision"
  echo "reason: ${reason:-the asked-for flavour is installed}"
  echo "flavour: $flavour"
  echo "mpi: $want_mpi"
  echo "python: $PYTHON"
  echo "torch: $torch_version"
  echo "torch_build: $torch_build"
  echo "installed: $installed${installed_flavour:+ $installed_flavour}"
  echo "cache: $wheel_dir"
  echo "wheel: ${wheel:-none}"
  echo "adopt_from: ${adopt_from:-none}"
  echo "wheel_check: $wheel_check"
  echo "build_log: $build_log"
fi

if [ "$decision" = skip ]; then
  [ "$dry_run" = 1 ] || say "horovod $HOROVOD_VERSION ($flavour flavour) already installed"
  exit 0
fi

# Runtime dependencies of Horovod (setup.py imports packaging too), installed only when missing so that an
# offline machine that already has them never reaches for the network.
missing=$("$PYTHON" - <<'EOF'
import importlib.metadata as md
missing = []
for name in ("cloudpickle", "psutil", "pyyaml", "packaging"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
EOF
) || fail "check runtime dependencies"
missing_build=""
"$PYTHON" -c 'import setuptools' 2>/dev/null || missing_build=setuptools

# Horovod's CMake and makefiles take the build folder's path unquoted in places: letters, digits and . _ + - /
# only (a '+' is safe once SET_OUTPUT_DIR is patched below).
plain_path() { case "$1" in ''|*[!A-Za-z0-9._+/-]*) return 1 ;; esac; }
build_name=${key//+/_}

# The build environment: folders, MPI, CUDA, NCCL, cmake, the sdist. Sets work, cmake_bin, sdist, jobs.
prepare_build() {
  # The build tree, the NCCL link folder and the wheel live here until the wheel is cached.
  local build_root=${KFAC_HVD_BUILD_DIR:-$CACHE/build} prefix=""
  if ! plain_path "$build_root"; then
    [ -z "${KFAC_HVD_BUILD_DIR:-}" ] \
      || fail "choose build folder (KFAC_HVD_BUILD_DIR='$build_root' holds characters other than letters, digits and . _ + - /)"
    build_root=${TMPDIR:-/tmp}
    plain_path "$build_root" \
      || fail "choose build folder (neither the cache '$CACHE' nor TMPDIR='$build_root' is a path of letters, digits and . _ + - / only; set KFAC_HVD_BUILD_DIR)"
    prefix=kfac-hvd-build-
    [ "$dry_run" = 1 ] || say "the cache's path '$CACHE' holds characters the build cannot take; building under $build_root"
  fi
  mkdir -p "$build_root" || fail "create build folder $build_root"
  build_root=$(cd "$build_root" && pwd)
  if [ "$dry_run" = 1 ]; then
    # Kept, so that what the dry run prints can be looked at; one per key, replaced on each dry run.
    work="$build_root/$prefix$build_name.dry-run"
    rm -rf "$work"
    mkdir -p "$work"
  else
    work=$(mktemp -d "$build_root/$prefix$build_name.XXXXXX")
    trap 'rm -rf "$work"' EXIT
  fi

  if [ "$want_mpi" = 1 ]; then
    [ -n "$mpicxx" ] || fail "find MPI (${MPICXX:-mpicxx} not found; apt-get install openmpi-bin libopenmpi-dev)"
    export HOROVOD_WITH_MPI=1
    unset HOROVOD_WITHOUT_MPI
  else
    export HOROVOD_WITHOUT_MPI=1
    unset HOROVOD_WITH_MPI
  fi

  # The torch wheel is a CUDA build, so Horovod's CMake looks for the CUDA toolkit even for the cpu
  # flavour. nvcc on PATH may be a wrapper script; the toolkit is the folder whose bin/ holds the real nvcc.
  if [ -z "${CUDA_HOME:-}" ]; then
    nvcc_path=$(command -v nvcc || true)
    if [ -n "$nvcc_path" ]; then
      real=$(grep -aoE '/[^ "'\'']*/bin/nvcc' "$nvcc_path" 2>/dev/null | head -1 || true)
      [ -n "$real" ] && [ -x "$real" ] || real=$(readlink -f "$nvcc_path")
      CUDA_HOME=$(dirname "$(dirname "$real")")
    fi
  fi
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] || fail "find CUDA toolkit (no bin/nvcc in CUDA_HOME=$CUDA_HOME)"
    export CUDA_HOME HOROVOD_CUDA_HOME="$CUDA_HOME"
  elif [ "$flavour" = NCCL ]; then
    fail "find CUDA toolkit (no nvcc on PATH; set CUDA_HOME)"
  fi

  if [ "$flavour" = NCCL ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    # Which GPUs the kernels are compiled for: 80 A100, 90 H100/H200 (comma-separated for several).
    # 70 (V100) needs a CUDA 12.x toolkit and torch build: nvcc 13 has no compute_70.
    export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-90}
    # Minutes of compiling would end in a Horovod whose kernels (or torch's) cannot run on the GPU asked for.
    mismatch=$("$PYTHON" "$REPO/scripts/cuda_build.py" arch-mismatch "$HOROVOD_BUILD_CUDA_CC_LIST" "$CUDA_HOME/bin/nvcc") \
      || fail "check architectures (scripts/cuda_build.py failed with $PYTHON)"
    [ -z "$mismatch" ] || fail "check architectures ($mismatch)"
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]; then
      # NCCL of the wheel next to torch first: torch loads that libnccl.so.2 and Horovod must use the same.
      nccl=$("$PYTHON" - <<'EOF'
import glob, importlib.util, os, site, sys
roots = []
spec = importlib.util.find_spec("torch")
if spec and spec.origin:
    roots.append(os.path.dirname(os.path.dirname(spec.origin)))
extra = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
if hasattr(site, "getusersitepackages"):
    extra.append(site.getusersitepackages())
for p in sys.path + extra:
    if p and os.path.isdir(p) and p not in roots:
        roots.append(p)
for root in roots:
    for header in sorted(glob.glob(os.path.join(root, "nvidia", "**", "include", "nccl.h"), recursive=True)):
        base = os.path.dirname(os.path.dirname(header))
        libs = sorted(glob.glob(os.path.join(base, "lib*", "libnccl.so*")))
        libs = libs or sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnccl.so*"), recursive=True))
        if libs:
            exact = [l for l in libs if l.endswith("libnccl.so.2")]
            print(os.path.dirname(header))
            print((exact or libs)[0])
            sys.exit(0)
EOF
) || fail "find NCCL"
      nccl_include=$(printf '%s\n' "$nccl" | sed -n 1p)
      nccl_so=$(printf '%s\n' "$nccl" | sed -n 2p)
      [ -n "$nccl_include" ] && [ -n "$nccl_so" ] \
        || fail "find NCCL (no site-packages/nvidia/*/include/nccl.h with lib*/libnccl.so* for $PYTHON; pip install nvidia-nccl-cu${torch_cuda%%.*}, or set HOROVOD_NCCL_HOME)"
      # Horovod's FindNCCL looks for libnccl.so; the wheel has only libnccl.so.2 (the SONAME, which
      # is what the built library will load, so the link is needed at build time only).
      mkdir -p "$work/nccl-lib"
      ln -sfn "$nccl_so" "$work/nccl-lib/libnccl.so"
      export HOROVOD_NCCL_INCLUDE="$nccl_include" HOROVOD_NCCL_LIB="$work/nccl-lib"
    fi
    export HOROVOD_NCCL_LINK=${HOROVOD_NCCL_LINK:-SHARED}
  else
    unset HOROVOD_GPU_OPERATIONS
    [ -z "${CUDA_HOME:-}" ] || export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
  fi

  # cmake: the one given, else the first >= 3.13 on PATH or next to the interpreter; pip's only when none.
  cmake_version() { "$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p'; }
  cmake_bin=${HOROVOD_CMAKE:-}
  if [ -z "$cmake_bin" ]; then
    for c in $(type -ap cmake) "$scripts_dir/cmake"; do
      [ -x "$c" ] || continue
      v=$(cmake_version "$c")
      if [ -n "$v" ] && printf '3.13\n%s\n' "$v" | sort -V -C; then cmake_bin=$c; break; fi
    done
  fi
  # Horovod's setup.py takes this one instead of whatever `cmake` is first on PATH.
  [ -z "$cmake_bin" ] || export HOROVOD_CMAKE="$cmake_bin"
  # Gloo asks for cmake_minimum_required(< 3.5), which cmake 4.x refuses unless this is set; 3.x ignores it.
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  jobs=${KFAC_HVD_BUILD_JOBS:-$(nproc)}
  # Set rather than inherited: under make, MAKEFLAGS carries the caller's flags and jobserver.
  export MAKEFLAGS="-j$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
  unset MFLAGS MAKELEVEL
  if ! command -v make >/dev/null 2>&1 && command -v ninja >/dev/null 2>&1; then
    export CMAKE_GENERATOR=Ninja
  fi
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1

  sdist=${HOROVOD_SDIST:-}
  if [ -z "$sdist" ]; then
    for s in "$REPO/.gpu_carry/$SDIST_NAME" "$CACHE/sdist/$SDIST_NAME"; do
      [ -f "$s" ] && { sdist=$s; break; }
    done
  fi
  if [ -n "$sdist" ]; then
    verify_sdist "$sdist"
  fi
}
[ "$decision" != build ] || prepare_build

if [ "$dry_run" = 1 ]; then
  echo "missing_runtime: ${missing:-none}"
  if [ "$decision" = build ]; then
    echo "missing_build: ${missing_build:-none}"
    echo "sdist: ${sdist:-download into $CACHE/sdist}"
    echo "cmake: ${cmake_bin:-none (would pip install 'cmake>=3.13,<4')}"
    echo "work: $work"
    env | grep -E '^(HOROVOD_|CUDA_HOME=|CMAKE_|MAKEFLAGS=|PYTHONPATH=)' | sort | sed 's/^/env: /'
  fi
  exit 0
fi

# Builds the wheel from the patched sdist, checks its layout and caches it. Sets wheel.
build_wheel() {
  : >"$build_log"
  if [ -n "$missing_build" ]; then
    say "installing $missing_build"
    pip_install "$missing_build" >>"$build_log" 2>&1 || fail "install $missing_build" "$build_log"
  fi
  if [ -z "$cmake_bin" ]; then
    say "no cmake >= 3.13 found; installing one with pip"
    pip_install "cmake>=3.13,<4" >>"$build_log" 2>&1 || fail "install cmake" "$build_log"
    cmake_bin="$scripts_dir/cmake"
    [ -x "$cmake_bin" ] || fail "install cmake (no $cmake_bin after pip install)" "$build_log"
  fi
  export HOROVOD_CMAKE="$cmake_bin"
  if [ -z "$sdist" ]; then
    say "downloading the horovod $HOROVOD_VERSION sdist"
    download_sdist "$CACHE/sdist" "$build_log"
    sdist="$CACHE/sdist/$SDIST_NAME"
  fi
  tar -xzf "$sdist" -C "$work" || fail "unpack sdist $sdist"
  local tree="$work/horovod-$HOROVOD_VERSION"

  say "patching the sdist (C++20; literal output folders; no setup_requires; no distutils in horovodrun; newer GCC)"
  for f in "$tree/CMakeLists.txt" "$tree/horovod/torch/CMakeLists.txt"; do
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$f"
    grep -q 'set(CMAKE_CXX_STANDARD 20)' "$f" || fail "patch $f"
  done
  # SET_OUTPUT_DIR strips the source folder from each library's folder with a regular expression built from
  # the path, so a '+' (or any other metacharacter) in the path made it miss and the extension landed in
  # the wheel under the absolute path. file(RELATIVE_PATH) compares literally and gives the same result.
  sed -i 's|^\( *\)string(REGEX REPLACE "${PROJECT_SOURCE_DIR}(/)?" "" SUB_FOLDER "${CMAKE_CURRENT_SOURCE_DIR}")$|\1file(RELATIVE_PATH SUB_FOLDER "${PROJECT_SOURCE_DIR}" "${CMAKE_CURRENT_SOURCE_DIR}")|' \
    "$tree/cmake/Utilities.cmake"
  grep -q '^ *file(RELATIVE_PATH SUB_FOLDER "${PROJECT_SOURCE_DIR}" "${CMAKE_CURRENT_SOURCE_DIR}")$' \
    "$tree/cmake/Utilities.cmake" || fail "patch cmake/Utilities.cmake"
  # setup_requires would make setuptools fetch (over the network) packages the build does not use.
  sed -i 's/setup_requires=require_list if is_build_action() else \[\],/setup_requires=[],/' "$tree/setup.py"
  grep -q 'setup_requires=\[\],' "$tree/setup.py" || fail "patch $tree/setup.py"
  # Python 3.12 has no distutils; horovodrun imports this one helper from it.
  sed -i 's/^from distutils.spawn import find_executable$/from shutil import which as find_executable/' \
    "$tree/horovod/runner/js_run.py"
  grep -q '^from shutil import which as find_executable$' "$tree/horovod/runner/js_run.py" \
    || fail "patch $tree/horovod/runner/js_run.py"
  # Newer GCC (13, 14) no longer brings <string> in through <mutex> and friends.
  sed -i 's/^#include <mutex>$/#include <mutex>\n#include <string>/' "$tree/horovod/common/group_table.h"
  grep -q '^#include <string>$' "$tree/horovod/common/group_table.h" || fail "patch group_table.h"
  # GCC 14's headers do not compile as C++11, which the CUDA kernels ask nvcc for.
  sed -i 's/^set(CMAKE_CUDA_STANDARD 11)$/set(CMAKE_CUDA_STANDARD 17)/' "$tree/horovod/common/ops/cuda/CMakeLists.txt"
  grep -q '^set(CMAKE_CUDA_STANDARD 17)$' "$tree/horovod/common/ops/cuda/CMakeLists.txt" \
    || fail "patch horovod/common/ops/cuda/CMakeLists.txt"

  {
    echo "# build environment"
    env | grep -E '^(HOROVOD_|CUDA_HOME=|CMAKE_|MAKEFLAGS=|PYTHONPATH=)' | sort
    echo "# cmake: $cmake_bin ($(cmake_version "$cmake_bin"))"
    echo "# build tree: $tree"
  } >>"$build_log"
  say "building the $flavour wheel from the sdist with $jobs jobs (several minutes; log: $build_log)"
  local start=$SECONDS built problem
  (cd "$tree" && "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps --no-cache-dir -w "$work/out" .) \
    >>"$build_log" 2>&1 || fail "build wheel" "$build_log"
  say "built in $((SECONDS - start)) s"
  built=$(ls "$work"/out/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -1)
  [ -n "$built" ] || fail "build wheel (no wheel in $work/out)" "$build_log"
  problem=$(wheel_problem "$built")
  if [ -n "$problem" ]; then
    set_aside "$built" "$problem" >>"$build_log"
    fail "check the built wheel ($problem; not cached, kept in $CACHE/wheels/set-aside/)" "$build_log"
  fi
  wheel="$wheel_dir/$(basename "$built")"
  put_in_cache "$built" "$wheel"
}

# Installs $wheel and asks horovod.torch what it has; sets install_problem (empty when it is the flavour asked for).
install_wheel() {
  say "installing $wheel"
  local reinstall=--force-reinstall
  [ -z "$target" ] || reinstall=""
  if pip_install --no-deps $reinstall "$wheel" >>"$install_log" 2>&1; then
    probe_env
    read_installed
    install_problem=$reason
  else
    install_problem="pip could not install it"
  fi
}

: >"$install_log"
if [ -n "$missing" ]; then
  say "installing $missing"
  # shellcheck disable=SC2086
  pip_install $missing >>"$install_log" 2>&1 || fail "install dependencies ($missing)" "$install_log"
fi
[ "$decision" != build ] || build_wheel
if [ -n "$adopt_from" ]; then
  say "taking over $adopt_from (cached under the key without the torch build; it loads the CUDA runtime of torch $(pv torch_full))"
  put_in_cache "$adopt_from" "$wheel"
fi
install_wheel
if [ -n "$install_problem" ] && [ "$decision" = install-cached ]; then
  set_aside "$wheel" "$install_problem"
  decision=build
  prepare_build
  build_wheel
  install_wheel
fi
if [ -n "$install_problem" ]; then
  # A fresh build that installs without its flavour must not be taken from the cache next time either.
  set_aside "$wheel" "$install_problem" >>"$install_log"
  fail "check installed horovod ($install_problem; the wheel is kept in $CACHE/wheels/set-aside/)" "$install_log"
fi

# horovodrun is how the launcher starts: it must run, and its report goes to the log and the terminal.
{
  if [ -x "$scripts_dir/horovodrun" ]; then
    "$scripts_dir/horovodrun" --check-build
  else
    "$PYTHON" -c 'import sys; from horovod.runner.launch import run_commandline; sys.argv = ["horovodrun", "--check-build"]; run_commandline()'
  fi
} >"$install_log.check" 2>&1 || { cat "$install_log.check" >>"$install_log"; fail "horovodrun --check-build" "$install_log"; }
cat "$install_log.check" | tee -a "$install_log"
rm -f "$install_log.check"
say "horovod $HOROVOD_VERSION ($flavour flavour) installed"
