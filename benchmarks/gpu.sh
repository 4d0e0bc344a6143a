#!/usr/bin/env bash
# One GPU run, under 8 minutes on one GPU: the CUDA-only tests, then benchmarks/bench_gpu.py (bf16 training-step
# and LM benchmarks against transformers + peft in bf16, peak CUDA memory in the SST-2 report's setting),
# which writes the "GPU" section of benchmarks/RESULTS.md. Commit that file afterwards.
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine
#   DEVICE=cpu bash benchmarks/gpu.sh      # dry run of every step on a CPU (tiny shapes, writes nothing)
#
# Real data (alpaca_2k, squad_v1 and the GPT-2 vocabulary) is read from $GPT2LORA_SHARED, else ./shared, else
# ../shared; without it the LM part is reported as not measured.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${GPT2LORA_SHARED:-}" ]]; then
    if [[ -d "$REPO/shared/data" ]]; then GPT2LORA_SHARED="$REPO/shared"; else GPT2LORA_SHARED="$REPO/../shared"; fi
fi
export GPT2LORA_SHARED
LOG="$(mktemp -d)"
started=$SECONDS

echo "== device"
if [[ "$DEVICE" == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', ok); sys.exit(0 if ok else 1)"
fi

echo "== CUDA-only tests (pytest -k cuda)"
set +e
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/ 2>&1 | tee "$LOG/tests.txt"
status=${PIPESTATUS[0]}
set -e
summary="$(grep -E '(passed|failed|skipped|deselected|error)' "$LOG/tests.txt" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
[[ $status -eq 124 ]] && summary="timed out after 180 s: $summary"
echo "tests: ${summary:-no summary} (exit $status)"

echo "== benchmarks"
if [[ "$DEVICE" == cuda* ]]; then
    timeout 420 "$PYTHON" benchmarks/bench_gpu.py --device "$DEVICE" --precision bf16 --tests "${summary:-none} (exit $status)"
else
    timeout 420 "$PYTHON" benchmarks/bench_gpu.py --device cpu --shape tiny --no-write --tests "${summary:-none} (exit $status)"
fi
echo "== done in $((SECONDS - started)) s; tests exit $status"
exit "$status"
