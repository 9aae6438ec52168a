#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, run the speed benchmark in bf16 and a quick SAPT pipeline
# in bf16, and print the tables. Usage (from anywhere): bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}  # e.g. PYTHON=venv/bin/python: no need to activate the environment
OUT_DIR=${1:-gpu_check_out}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
nvidia-smi -L || { echo "gpu_check: no CUDA GPU visible" >&2; exit 2; }
$PYTHON -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2

echo "== speed benchmark (CUDA, bf16 autocast) =="
# SmolLM2-135M's shape with its growth table (SAPT at 1..60 blocks): docs/speed.md has the CPU numbers.
$PYTHON bench/speed.py --device cuda --bf16 --models t5,llama,smollm2 --growth 1,10,20,30,45,60 --growth-models smollm2 \
    --repeats 5 --warmup 2 --gen-warmup 1 --json "$OUT_DIR/speed_cuda.json" | tee "$OUT_DIR/speed_cuda.md"
bench_status=${PIPESTATUS[0]}

echo "== quick SAPT pipeline on the GPU in bf16 =="
$PYTHON -m sapt prepare_data --synthetic --dest "$WORK" > /dev/null 2>&1 || true
DATA=${SAPT_DATA_SOURCE:-$WORK}
$PYTHON gen_script_long_t5.py --quick --run_name gpu_check --workdir "$WORK" --output "$WORK/gpu_check.sh" \
    --data_dir "$DATA/CL_Benchmark" --gen_data_root "$DATA/generated_data" --set bf16=true > /dev/null
bash "$WORK/gpu_check.sh" 2>&1 | tail -25 | tee "$OUT_DIR/pipeline.txt"
pipeline_status=${PIPESTATUS[0]}
cp "$WORK"/results/gpu_check.json "$OUT_DIR/" 2>/dev/null || true
echo "gpu_check: benchmark exit $bench_status, pipeline exit $pipeline_status"
[ "$bench_status" -eq 0 ] && [ "$pipeline_status" -eq 0 ]
