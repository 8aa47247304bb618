#!/usr/bin/env bash
# The GPU check: everything of kfac-hvd that needs a GPU, on one NVIDIA GPU, in under 8 minutes.
#
#   make horovod-sdist                 # on a machine with internet: .gpu_carry/horovod-0.28.1.tar.gz
#   bash scripts/gpu_check.sh OUTDIR   # on the GPU machine, from the repository root
#
# Written for a single-GPU machine whose image has Python 3 with torch (CUDA build), nvcc, cmake, ninja,
# NCCL from pip (nvidia-nccl-cu13), mpi4py, pytest, pyyaml, tqdm, tensorboard and matplotlib, but no
# Horovod and no internet (the H200 machines lent to this project). In order, each phase under a time
# limit, a failed phase recorded and the next one run:
#   1. the machine: GPU, driver, torch, CUDA;
#   2. pytest -m cuda: exactness against a CPU float64 reference, bf16/fp16 autocast, channels_last, the
#      state round trip through the CPU, CUDA's own count of synchronisations, a step's peak memory;
#   3. the step cost of ResNet-50 at 224 px and 128 images, 1 rank, bf16 and fp32: SGD, K-FAC every step
#      with the factor products at the autocast dtype and with the earlier fp32 copies
#      (narrow_factor_products=False), with batched and with per-factor inversions (batched_inversion=False),
#      λ = 0.25 held still (the worst case), the replayed schedule of a recorded run (the real-schedule
#      steady state) and the preconditioning floor, the peak CUDA memory of each, and each phase of an
#      update step against the H200's datasheet limits (bench/step_cost.py, its worker run
#      directly); then fp32 with TF32 matrix products;
#   4. Horovod 0.28.1 built there from the carried sdist (Gloo + NCCL; MPI only if mpicxx is found),
#      into a private folder, timed;
#   5. with that Horovod: the launcher's cuda tests, and the launcher end to end on the GPU (synthetic
#      ImageNet-sized data, bf16, channels_last), 1 rank, then 2 ranks sharing the GPU under horovodrun
#      --gloo (NCCL refuses two ranks on one device: then that phase fails and its log says so).
# Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (a short table and the step cost's headline:
# bench/step_cost_summary.py), with the logs beside them.
# GPU_CHECK_SKIP="step_cost step_cost_tf32" leaves phases out (a rerun of the others).
# Without a GPU it stops at once with one line and exit code 2.
set -uo pipefail

out=${1:-}
if [ -z "$out" ]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is false); nothing to check" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$(date +%s)
phases="$out/phases.tsv"
: >"$phases"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# phase NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to OUTDIR/NAME.log, records
# NAME, exit status and seconds.
phase() {
  local name=$1 limit=$2; shift 2
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*) echo "[gpu_check] $name skipped (GPU_CHECK_SKIP)"; return 0 ;; esac
  local t0; t0=$(date +%s)
  echo "[gpu_check] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$phases"
  echo "[gpu_check] $name: exit $rc in $(( $(date +%s) - t0 ))s"
  return 0
}

phase machine 60 bash -c "nvidia-smi; $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.get_arch_list())'"

# What needs no Horovod first, so that a slow build cannot cost the measurements.
phase pytest_cuda 120 "$PYTHON" -m pytest -q -rs -m cuda tests/test_cuda.py --junitxml="$out/pytest_cuda.xml"
phase step_cost 300 "$PYTHON" -m bench.step_cost --device cuda --ranks 1 --launcher direct \
  --image-size 224 --batch 128 --precisions bf16,fp32 \
  --configs sgd,every,every_wide,every_unbatched,lambda,replay,floor --out "$out/step_cost"
# The same fp32 step with TF32 matrix products (what train.tf32: true does), K-FAC's factor products included.
phase step_cost_tf32 90 env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "$PYTHON" -m bench.step_cost --device cuda \
  --ranks 1 --launcher direct --image-size 224 --batch 128 --precisions fp32 --configs sgd,every,floor \
  --out "$out/step_cost_tf32"

# Horovod into a private folder; the build uses every core.
hvd_site=/tmp/kfac-hvd-horovod
phase horovod_build 240 env HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST=90 PYTHON="$PYTHON" \
  KFAC_HVD_TARGET="$hvd_site" KFAC_HVD_BUILD_JOBS="$(nproc)" KFAC_HVD_CACHE=/tmp/kfac-hvd-cache \
  bash scripts/install_horovod.sh
for log in /tmp/kfac-hvd-cache/logs/*.log; do   # the build's own log, for a failed build
  [ -f "$log" ] && { echo "=== $log (last 40 kB)"; tail -c 40000 "$log"; } >>"$out/horovod_build.log"
done
export PYTHONPATH="$hvd_site:$PYTHONPATH" PATH="$hvd_site/bin:$PATH"
horovod=no
"$PYTHON" -c 'import horovod.torch as h; assert h.nccl_built()' >/dev/null 2>&1 && horovod=yes

run_launcher() {   # run_launcher NAME RANKS: the synthetic ResNet-50 config on the GPU for 12 steps
  local name=$1 ranks=$2
  local cmd=("$PYTHON" -m launch.train --config configs/imagenet/resnet50_synthetic_throughput.yaml
             train.device=cuda train.precision=bf16 train.channels_last=true train.max_steps=12
             data.batch_size=64 data.workers=2 data.synthetic_size=2048 data.synthetic_val_size=256
             log.dir="$out/run_$name" log.tensorboard=false log.every_steps=4 train.world_size=null)
  if [ "$ranks" -gt 1 ]; then
    phase "$name" 60 horovodrun -np "$ranks" --gloo -H "localhost:$ranks" "${cmd[@]}"
  else
    phase "$name" 60 "${cmd[@]}"
  fi
}
if [ "$horovod" = yes ]; then
  phase pytest_launcher_cuda 90 "$PYTHON" -m pytest -q -rs -m cuda tests/test_launch_device.py
  run_launcher launcher_1rank 1
  run_launcher launcher_2ranks 2    # NCCL refuses two ranks on one device: then this phase fails and says so
fi

"$PYTHON" - "$out" "$horovod" "$started" <<'EOF'
import json, os, sys, time
out, horovod, started = sys.argv[1], sys.argv[2] == "yes", int(sys.argv[3])
phases = {}
for line in open(os.path.join(out, "phases.tsv")):
    name, rc, seconds = line.rstrip("\n").split("\t")
    phases[name] = {"exit": int(rc), "seconds": int(seconds)}

def tail(name, lines=6):
    path = os.path.join(out, f"{name}.log")
    return open(path, errors="replace").read().splitlines()[-lines:] if os.path.exists(path) else []

result = {"phases": phases, "horovod_nccl": horovod, "total_seconds": int(time.time()) - started,
          "machine": tail("machine", 30), "pytest_cuda": tail("pytest_cuda", 12)}
check = [l for l in open(os.path.join(out, "horovod_build.log"), errors="replace") if "[X]" in l or "[ ]" in l] \
    if os.path.exists(os.path.join(out, "horovod_build.log")) else []
result["horovod_check_build"] = [l.strip() for l in check]
for name in ("step_cost", "step_cost_tf32"):
    path = os.path.join(out, name, "step_cost.json")
    if os.path.exists(path):
        result[name] = json.load(open(path))
for name in ("launcher_2ranks", "launcher_1rank"):
    summary = os.path.join(out, f"run_{name}", "summary.json")
    if os.path.exists(summary):
        s = json.load(open(summary))
        result[name] = {k: s.get(k) for k in ("world_size", "steps", "images_per_s", "train_time_s")}
        result[name]["kfac_seconds"] = (s.get("kfac") or {}).get("seconds")
    elif name in phases:
        result[name] = {"failed": tail(name, 8)}
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
rows = ["| phase | exit | seconds |", "|---|---|---|"]
rows += [f"| {name} | {p['exit']} | {p['seconds']} |" for name, p in phases.items()]
rows += ["", f"Horovod with NCCL: {'yes' if horovod else 'no'}; total {result['total_seconds']} s.", ""]
for name in ("launcher_2ranks", "launcher_1rank"):
    if name in result and "images_per_s" in result[name]:
        rows.append(f"- {name}: {result[name]['images_per_s']:.0f} images/s over {result[name]['steps']} steps")
    elif name in result:
        rows.append(f"- {name}: failed: {' / '.join(result[name]['failed'][-2:])}")
rows.append("- pytest -m cuda: " + (result["pytest_cuda"][-1] if result["pytest_cuda"] else "no output"))
rows.append("- step cost: see step_cost/step_cost.md" if "step_cost" in result else "- step cost: no result")
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
# The step cost's headline (old/new paths, steady states × SGD, each phase against the H200's limits).
if [ -f "$out/step_cost/step_cost.json" ]; then
  for precision in bf16 fp32; do
    echo >>"$out/gpu_check.md"
    "$PYTHON" -m bench.step_cost_summary "$out/step_cost/step_cost.json" --precision "$precision" \
      >>"$out/gpu_check.md" 2>>"$out/step_cost.log"
  done
  sed -n '/^### Step cost/,$p' "$out/gpu_check.md"
fi
