#!/usr/bin/env bash
# The engine's device run, in one go: correctness where CUDA graphs run, then speed at BLIP-2's LM sizes. Run from
# the repository root:
#     bash bench/run_gpu.sh            # on a GPU machine
#     bash bench/run_gpu.sh --smoke    # here, on the CPU: every part at tiny sizes, so a broken argument, import or
#                                      # output path shows before a lease is spent on it (tests/test_run_gpu.py)
# Everything it prints is also written to $OUT/gpu_run.log (the device tool returns only the output's tail). Exits
# with the number of parts that failed or ran out of time.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "${OUT:-/tmp}/gpu_run.log") 2>&1
python=${PYTHON:-python3}  # the device's python3 is the one that holds PyTorch
if [[ ${1:-} == --smoke ]]; then
    device=cpu dtype=float32 opt=tiny t5=tiny-t5 big=tiny reps=1 short="--tokens 4"
    serve=opt-demo  # the smallest with the demo's exit layers
    batches="2 4" crossover="2 4" requests=4 tokens=4
else
    device=cuda dtype=bfloat16 opt=opt-2.7b t5=flant5-xl big=opt-6.7b reps=3 short="" serve=opt-2.7b
    batches="8 32" crossover="8 64 256" requests=32 tokens=32
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
on="--device $device --dtype $dtype"
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
failed=0
run() { echo; echo "### $*"; timeout "$1" "${@:2}" || { echo "### exit $? (timeout or failure)"; failed=$((failed + 1)); }; }
# limits sum to 450 s, so that a rerun fits a 15-minute lease with two machine starts (no part has been timed on a
# GPU yet; 3 repeats each, the benchmarks print the fastest, where 5 had 580 s): check_device takes ~17-21 s on our CPU (its
# scheduler checks included); OPT-2.7B's engine run gets the most because Hugging Face's static-cache
# generate compiles itself on its first call; the crossover is where per-row compaction starts to pay
# (COMPACT_FROM_ROWS); then serving at OPT-2.7B's size: one at a time, static batches and continuous batching
# (issue 28's table, wall clock in steps)
run 50 $python bench/check_device.py --device $device
run 160 $python bench/bench_engine.py $on --preset $opt --batch-sizes $batches --repeats $reps $short
run 65 $python bench/bench_engine.py $on --preset $t5 --repeats $reps $short
run 40 $python bench/bench_batch.py $on --preset $opt --repeats $reps $short --crossover $crossover
run 40 $python bench/bench_engine.py $on --preset $big --batch-sizes ${batches%% *} --repeats $reps $short
run 95 $python bench/bench_serving.py $on --model random --preset $serve --rates 16 --requests $requests \
    --max-tokens $tokens --thresholds 0.1 --batch-wait 0.5 --prefill-chunk 512
echo; echo "### $failed part(s) failed"
exit $failed
