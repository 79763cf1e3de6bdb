#!/usr/bin/env bash
# CI step: mpicomm inside real vLLM (issue 9). Builds a SEPARATE venv for vLLM (never the
# project's own), cached under $MPICOMM_CACHE keyed on the recipe, then runs the vLLM integration
# tests: vLLM's init_distributed_environment + initialize_model_parallel under mpiexec -n 2 and
# -n 4 (TP, PP, DP x EP with MoE dispatch/combine), plus the plugin unit tests.
#
#   .ci/vllm.sh                       # vLLM 0.15.0 (default)
#   MPICOMM_VLLM_VERSION=0.15.1 .ci/vllm.sh
#
# Env: MPICOMM_CACHE (default ~/.cache/mpicomm), PYTHON (default python3),
#      MPICOMM_VLLM_INSTALL_TIMEOUT (s, default 900), MPICOMM_VLLM_TEST_TIMEOUT (s per mpiexec
#      run, default 420), MPICOMM_VLLM_SUITE_TIMEOUT (s, default 2400).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VLLM_VERSION=${MPICOMM_VLLM_VERSION:-0.15.0}
CACHE=${MPICOMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpicomm}
INSTALL_TIMEOUT=${MPICOMM_VLLM_INSTALL_TIMEOUT:-900}
SUITE_TIMEOUT=${MPICOMM_VLLM_SUITE_TIMEOUT:-2400}

# The recipe (measured, see /work/shared/ENVIRONMENT.md): torch 2.13.0 CPU first, vLLM without its
# dependencies (its wheel pins another torch), then the pure-Python packages its distributed layer
# and config classes import. A constraints file pins torch so nothing can pull another one. pip
# prints a dependency-conflict message about vLLM's torch pin: harmless; never run `pip check`.
TORCH_PIN="torch==2.13.0"
BASE_PKGS="mpi4py mpich numpy pytest pytest-timeout"
VLLM_DEPS="packaging psutil pyzmq urllib3 regex pydantic cbor2 gguf aiohttp msgspec pillow pybase64 cachetools cloudpickle py-cpuinfo prometheus_client"
case "$VLLM_VERSION" in
    0.15.*) VLLM_DEPS="$VLLM_DEPS transformers>=4.56.0,<5" ;;
    # measured for 0.33.0: transformers 5 and what its config classes import
    *) VLLM_DEPS="$VLLM_DEPS transformers>=5 openai-harmony openai uvloop xgrammar fastapi partial-json-parser llguidance" ;;
esac

RECIPE="python=$($PYTHON -c 'import sys; print(sys.version.split()[0])') $TORCH_PIN | $BASE_PKGS | vllm==$VLLM_VERSION --no-deps | $VLLM_DEPS"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
VENV="$CACHE/venv-vllm-$VLLM_VERSION-$KEY"

t0=$(date +%s)
if [ ! -f "$VENV/.complete" ]; then
    echo "== building vLLM venv $VENV (recipe: $RECIPE)"
    mkdir -p "$CACHE"
    rm -rf "$VENV"   # an incomplete earlier build (no .complete marker) is discarded
    "$PYTHON" -m venv "$VENV"
    constraints="$VENV/constraints.txt"
    echo "$TORCH_PIN" > "$constraints"
    pip_="$VENV/bin/python -m pip install -q --disable-pip-version-check -c $constraints"
    # shellcheck disable=SC2086
    timeout "$INSTALL_TIMEOUT" bash -c "
        set -e
        $pip_ $TORCH_PIN
        $pip_ $BASE_PKGS
        $pip_ --no-deps vllm==$VLLM_VERSION
        $pip_ $(printf '%q ' $VLLM_DEPS) 2>&1 | grep -v 'requires\|dependency conflicts\|incompatible' || true
    "
    "$VENV/bin/python" -c "import torch, vllm.distributed.parallel_state, mpi4py; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    touch "$VENV/.complete"
else
    echo "== reusing cached vLLM venv $VENV"
fi
t1=$(date +%s)
echo "== vLLM venv ready in $((t1 - t0)) s"

# mpicomm from this checkout, editable, so the vllm.platform_plugins entry point is registered.
timeout 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . \
    2>&1 | grep -v '^\s*$\|!!\|\*\*\*\|WheelFile\|strategy' || true

export OMP_NUM_THREADS=1
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
export PATH="$VENV/bin:$PATH"
timeout "$SUITE_TIMEOUT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/unit/test_vllm_plugin.py tests/system/test_vllm_mpi.py
t2=$(date +%s)
echo "== vLLM integration tests passed in $((t2 - t1)) s (total $((t2 - t0)) s)"
