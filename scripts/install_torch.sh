#!/usr/bin/env bash
# Put the asked-for torch build into a Python environment, unless the one installed satisfies it already
# (then nothing is downloaded or reinstalled). `make setup` runs it before Horovod is built.
#
#   TORCH_SPEC        pip requirements of torch and torchvision (required; the Makefile's default is
#                     "torch==2.14.1 torchvision==0.29.1", which pip takes from its configured indexes).
#                     An installed package satisfies a requirement as pip decides it: "torch==2.14.1"
#                     accepts any 2.14.1 build, "torch==2.14.1+cu126" only the CUDA 12.6 build of
#                     download.pytorch.org, so name the build (+cu126) to have a torch of another build
#                     replaced.
#   TORCH_INDEX_URL   the index to take them from (pip --index-url), e.g. https://download.pytorch.org/whl/cu126;
#                     empty: pip's configured indexes
#   PYTHON            interpreter of the target environment (default: python, else python3)
#
# The V100 set-up (a CUDA 12.6 build of torch, the only one of 2.14.1 with sm_70 kernels) is one command
# in README.md, "GPU generations".
#
# Usage: install_torch.sh [--dry-run]
#   --dry-run   prints the decision (keep, install), why, what is installed and the pip command; changes nothing
set -euo pipefail

say() { echo "install_torch: $*"; }
fail() { echo "install_torch: step '$1' failed" >&2; exit 1; }

dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_torch: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  command -v python >/dev/null 2>&1 || PYTHON=python3
fi
PYTHON=$(command -v "$PYTHON") || fail "find python ($PYTHON)"
[ -n "${TORCH_SPEC:-}" ] || fail "read TORCH_SPEC (empty; e.g. TORCH_SPEC=\"torch==2.14.1 torchvision==0.29.1\")"
# Word splitting is wanted: TORCH_SPEC holds one requirement per word.
# shellcheck disable=SC2206
spec=($TORCH_SPEC)

# Which requirements the environment does not meet, by pip's own rules (its vendored packaging when the
# environment has none), from the installed metadata: no torch import, so this takes a fraction of a second.
unmet() {
  "$PYTHON" - "${spec[@]}" <<'EOF'
import importlib.metadata as md
import sys
try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
installed, unmet = [], []
for text in sys.argv[1:]:
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        print("invalid: %s (%s)" % (text, str(exc).splitlines()[0]))
        sys.exit(0)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append("%s is not installed" % req.name)
        continue
    installed.append("%s %s" % (req.name, version))
    if not req.specifier.contains(version, prereleases=True):
        unmet.append("installed %s %s does not satisfy %s" % (req.name, version, text))
print("installed: " + ("; ".join(installed) or "none"))
print("unmet: " + "; ".join(unmet))
EOF
}
field() { printf '%s\n' "$2" | sed -n "s/^$1: //p" | head -1; }

state=$(unmet) || fail "check installed packages with $PYTHON"
invalid=$(field invalid "$state")
[ -z "$invalid" ] || fail "read TORCH_SPEC (not a pip requirement: $invalid)"
reason=$(field unmet "$state")

pip_cmd=("$PYTHON" -m pip install -q)
[ -z "${TORCH_INDEX_URL:-}" ] || pip_cmd+=(--index-url "$TORCH_INDEX_URL")
pip_cmd+=("${spec[@]}")
decision=install
[ -n "$reason" ] || decision=keep

if [ "$dry_run" = 1 ]; then
  echo "decision: $decision"
  echo "reason: ${reason:-the installed packages satisfy $TORCH_SPEC}"
  echo "installed: $(field installed "$state")"
  echo "pip: ${pip_cmd[*]}"
  exit 0
fi
if [ "$decision" = keep ]; then
  say "$(field installed "$state") satisfy $TORCH_SPEC"
  exit 0
fi
say "$reason; installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
"${pip_cmd[@]}" || fail "pip install $TORCH_SPEC${TORCH_INDEX_URL:+ --index-url $TORCH_INDEX_URL}"
# pip can end without an error and without the asked-for build (a constraints file, a resolver choice).
state=$(unmet) || fail "check installed packages with $PYTHON"
after=$(field unmet "$state")
[ -z "$after" ] || fail "install $TORCH_SPEC ($after after pip install)"
say "installed $(field installed "$state")"
