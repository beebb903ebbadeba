#!/usr/bin/env bash
# What the next session with a GPU should run first, in one call of the device tool of about 6 minutes
# (run from the repo root; $OUT collects the logs and JSON):
#     run(command="bash bench/gpu_next.sh", carry=[".whl"], timeout_s=450)
# (.whl: `pip download diffusers==0.42.1 --no-deps -d .whl`, for the tests' reference pipelines.)
# 1. the GPU tests of the graphs: sampling's replayed UNet steps equal eager ones (tests/test_graphs.py), and
#    train.py's UNet step recorded as CUDA graphs (minidb/graphs.py TrainingGraph) trains as eagerly
#    (tests/test_train_graph.py), every UserWarning an error (a recording that failed would warn);
# 2. what the session of 2026-11-28 could not time: train.py's whole SDXL LoRA step at 1024 px end to end,
#    recorded (no --gradient-checkpointing) and with checkpointing (eager), with its peak memory
#    (bench/sdxl_train_gpu.py: a random SDXL file, 3 photos, the default recipe, 6 steps).
set -o pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L
# -o addopts="": pytest.ini asks for pytest-xdist workers
echo "== GPU tests"
timeout 120 python3 -m pytest -o addopts="" tests/test_train_graph.py tests/test_graphs.py -q -p no:cacheprovider -W error::UserWarning 2>&1 | tee $OUT/tests.log | grep -E "passed|failed|^FAILED|^E  " | tail -15
for mode in recorded checkpointed; do
    echo "== train.py SDXL LoRA, $mode"
    flag=$([ $mode = recorded ] && echo --no-gradient-checkpointing)
    timeout 150 python3 bench/sdxl_train_gpu.py --steps 6 $flag --json $OUT/train-$mode.json 2>&1 | tee $OUT/train-$mode.log | grep -E "median_step_s|peak_allocated|peak_reserved|Error" | tail -4
done
echo "done in $(( $(date +%s) - start )) s"
