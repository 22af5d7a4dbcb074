#!/usr/bin/env bash
# The engine's device run, in one go (at most ~10 minutes on an H200): correctness where CUDA graphs run, then speed
# at BLIP-2's LM sizes. Run from the repository root: bash bench/run_gpu.sh
# Everything it prints is also written to $OUT/gpu_run.log (the device tool returns only the output's tail).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "${OUT:-/tmp}/gpu_run.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run() { echo; echo "### $*"; timeout "$1" "${@:2}" || echo "### exit $? (timeout or failure)"; }
# limits sum to 580 s (a device command may run 600): check_device takes ~10 s on our CPU (its scheduler checks
# included); OPT-2.7B's engine run gets the most because Hugging Face's static-cache generate compiles itself on its
# first call; the crossover is where per-row compaction starts to pay (COMPACT_FROM_ROWS); then serving at
# OPT-2.7B's size: one at a time, static batches and continuous batching (issue 28's table, wall clock in steps)
run 60 python bench/check_device.py --device cuda
run 220 python bench/bench_engine.py --device cuda --dtype bfloat16 --preset opt-2.7b --batch-sizes 8 32 --repeats 5
run 90 python bench/bench_engine.py --device cuda --dtype bfloat16 --preset flant5-xl --repeats 5
run 50 python bench/bench_batch.py --device cuda --dtype bfloat16 --preset opt-2.7b --repeats 3 --crossover 8 64 256
run 50 python bench/bench_engine.py --device cuda --dtype bfloat16 --preset opt-6.7b --batch-sizes 8 --repeats 5
run 110 python bench/bench_serving.py --device cuda --dtype bfloat16 --model random --preset opt-2.7b --rates 16 \
    --requests 32 --max-tokens 32 --thresholds 0.1 --batch-wait 0.5 --prefill-chunk 512
