#!/usr/bin/env bash
# What the next session with a GPU should run first, in one call of the device tool of about 4 minutes
# (run from the repo root; $OUT collects the logs and JSON):
#     run(command="bash bench/gpu_next.sh", carry=[".whl"], timeout_s=400)
# 1. the GPU tests of the graphs: sampling's replayed UNet steps equal eager ones (tests/test_graphs.py), and
#    train.py's UNet step recorded as CUDA graphs (minidb/graphs.py TrainingGraph) trains as eagerly
#    (tests/test_train_graph.py); the LoRA's batched casts and the frozen base's fp32 norms on CUDA, whose
#    train.py runs now go through the recorded step;
# 2. issue 13's last open target, the SDXL LoRA step at most 0.8x diffusers' time: diffusers + PEFT (fp32 and
#    bf16 adapters), minidb eager, and minidb's step as train.py now runs it on a GPU (TrainingGraph), timed in
#    turns in one process (bench/sdxl_lora_graph.py).
set -o pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L
# -o addopts="": pytest.ini asks for pytest-xdist workers
echo "== GPU tests"; timeout 150 python3 -m pytest -o addopts="" tests/test_train_graph.py tests/test_graphs.py -q -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -25
timeout 90 python3 -m pytest -o addopts="" tests/test_lora_training.py tests/test_sdxl_train.py -k "cast_at_once or holds_its_norms" -q -p no:cacheprovider 2>&1 | tee -a $OUT/tests.log | tail -8
echo "== SDXL LoRA step: diffusers, minidb eager, minidb as train.py runs it"
timeout 200 python3 bench/sdxl_lora_graph.py --json $OUT/lora-graph.json 2>&1 | tee $OUT/lora-graph.log | grep -v Warning | tail -6
echo "done in $(( $(date +%s) - start )) s"
