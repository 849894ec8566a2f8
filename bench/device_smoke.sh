#!/usr/bin/env bash
# Device smoke run (issue 22): on one NVIDIA GPU, in under 8 minutes, with no network (the embedded SmolLM2-135M is
# the only real model; the data folder is $CHAINTUNE_DATA_DIR or ../shared/data):
#   1. the tests marked `gpu` (tests/test_gpu.py);
#   2. eval and train throughput and peak memory of the embedded 135M model in bf16, with the memory planner's
#      estimate beside the measured peak (bench/device_throughput.py);
#   3. the same for a randomly initialised Llama-3.2-1B shape;
#   4. configs/device_smoke.yaml — the paper's training settings (full fine-tuning, lr 1e-5, batch 16, 5 seeds, full
#      test sets) on the embedded model — and its four findings (`chaintune summarize`).
# `--cpu` runs the same steps on the CPU at tiny sizes: the gpu tests skip, the tiny random test model stands in for
# the 1B shape and, in step 4, for the embedded model (the pipeline and the summary are checked, not the findings).
#     bench/device_smoke.sh [--cpu]          (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
CPU=0
case "${1:-}" in
  --cpu) CPU=1 ;;
  "") ;;
  *) echo "usage: bench/device_smoke.sh [--cpu]" >&2; exit 2 ;;
esac
if [[ $CPU == 0 ]] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "device_smoke: no CUDA device here; run bench/device_smoke.sh --cpu for the CPU-safe parts" >&2
  exit 2
fi
mkdir -p runs
OUT=$(mktemp -d runs/device_smoke.XXXXXX)
START=$SECONDS
step() { echo; echo "== $* (at $((SECONDS - START)) s)"; }

step "1/4 tests marked gpu"
"$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider

if [[ $CPU == 1 ]]; then
  SIZES=(--steps 2 --batch 4 --seq 64 --questions 20)  # 2 steps: the second runs with the AdamW moments
  step "2/4 throughput and peak memory: embedded SmolLM2-135M (CPU, fp32)"
  "$PYTHON" bench/device_throughput.py --model embedded --device cpu "${SIZES[@]}"
  step "3/4 throughput and peak memory: tiny random Llama (CPU, in place of the 1B shape)"
  "$PYTHON" bench/device_throughput.py --model tiny --device cpu "${SIZES[@]}"
  TINY="$OUT-tiny-model"  # the reproduction's pipeline on CPU with a random 4-layer Llama (seconds per stage)
  "$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import memory_plan
model, tokenizer = memory_plan.tiny_model(); model.save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])" "$TINY"
  REDUCE=(--set "model=$TINY" --set device=cpu --set "seeds=[0,1]" --set tasks.toxigenqa.train_limit=32 --set tasks.arc_easy.train_limit=32
          --set tasks.toxigenqa.eval_limit=40 --set tasks.arc_easy.eval_limit=40 --set quality_gate.validation_size=16
          --set curvature.examples=8 --set curvature.micro_batch=8 --set curvature.max_iter=3
          --set eval_max_tokens=2048)
else
  step "2/4 throughput and peak memory: embedded SmolLM2-135M (bf16)"
  "$PYTHON" bench/device_throughput.py --model embedded --device cuda --steps 20 --batch 16 --seq 256 --questions 2376
  step "3/4 throughput and peak memory: random Llama-3.2-1B shape (bf16)"
  "$PYTHON" bench/device_throughput.py --model llama-1b --device cuda --steps 10 --batch 16 --seq 256 --questions 1000
  REDUCE=()
fi

step "4/4 reproduction at the paper's training settings: configs/device_smoke.yaml → $OUT"
"$PYTHON" -m chaintune.cli run configs/device_smoke.yaml --set "output_dir=$OUT" ${REDUCE[@]+"${REDUCE[@]}"} --no-progress
"$PYTHON" -m chaintune.cli summarize "$OUT"
echo
echo "device_smoke: done in $((SECONDS - START)) s ($([[ $CPU == 1 ]] && echo CPU || echo CUDA)); results in $OUT"
