#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and the README set-up done (bash scripts/setup.sh): the GPU tests
# (pytest -m gpu, bitsandbytes 4-bit and 8-bit among them), then the GPU benchmarks on SmolLM2 (also loaded in
# 4-bit) and Gemma 3 270M and `run`, then one table of every figure
# as a multiple of the same machine's forward pass, with the CPU figures of bench/figures/ beside them.
# Nothing here needs editing on the GPU machine. Each step has its own time limit (525 s in all) so that the
# whole stays under 9 minutes. Exit 0 only when every step passed.
#   PYTHON=...       the interpreter (default: .venv/bin/python, or python3 where there is no .venv)
#   GPU_CHECK_OUT=.. where the logs and figures go (default: out/gpu-check)
#   GPU_CHECK_DEVICE=cpu  a rehearsal without a GPU: the same steps with the CPU standing in, on fewer prompts
#                    and with looser time limits, to check the script itself (its figures are the CPU's)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-out/gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

scale=1
sizes=(--prompts 8 --repeats 3 --dense-prompts 1)
if [ "$DEVICE" = cpu ]; then
  scale=20  # a rehearsal: the CPU takes far longer than the limits allow a GPU
  sizes=(--prompts 2 --repeats 1 --dense-prompts 0)
  export NEURON_ATTRIBUTION_TEST_DEVICE=cpu
  echo "gpu_check: rehearsal on the CPU (GPU_CHECK_DEVICE=cpu): the figures are the CPU's" | tee "$OUT/machine.txt"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $PYTHON's torch sees no CUDA GPU ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1))" >&2
  exit 2
else
  "$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" | tee "$OUT/machine.txt"
fi

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "gpu_check: == $name (limit ${limit} s)"
  if ! timeout $((limit * scale)) "$@" 2>&1 | tee "$OUT/$name.log"; then
    failed+=("$name")
    echo "gpu_check: $name FAILED (see $OUT/$name.log)" >&2
  fi
  echo "gpu_check: $name took $((SECONDS - started)) s"
}

# The first use of each offline model dequantises it into the cache: done once here, outside the timed steps.
step prepare 120 "$PYTHON" -c "import neuron_attribution as na; na.load_model(); na.load_model('gemma-3-270m')"
step tests 180 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -n 0 tests/test_gpu.py  # one process: the GPU to itself
step attribute-smollm2 60 "$PYTHON" bench/bench_attribute.py --device "$DEVICE" "${sizes[@]}" \
  --json "$OUT/attribute-smollm2.json"
step attribute-gemma 60 "$PYTHON" bench/bench_attribute.py --device "$DEVICE" --model gemma-3-270m "${sizes[@]}" \
  --json "$OUT/attribute-gemma.json"
step attribute-smollm2-4bit 60 "$PYTHON" bench/bench_attribute.py --device "$DEVICE" --quantization bnb-4bit \
  "${sizes[@]}" --json "$OUT/attribute-smollm2-4bit.json"
step run-smollm2 45 "$PYTHON" bench/bench_run.py --device "$DEVICE" --per-type 2 --batch-sizes 8 --top 300 \
  --json "$OUT/run-smollm2.json"

echo
"$PYTHON" bench/summary.py "$OUT" | tee "$OUT/summary.md"
if ((${#failed[@]})); then
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed ($SECONDS s)"
