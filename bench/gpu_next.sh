#!/usr/bin/env bash
# What the next session with a GPU should run first, in one call of the device tool of about 8 minutes
# (run from the repo root; $OUT collects the logs and JSON):
#     run(command="bash bench/gpu_next.sh", carry=[".whl"], timeout_s=570)
# 1. tests/test_graphs.py on the GPU, which the call of 2026-11-26 could not run (a bug in the tests,
#    since fixed): sampling's replayed UNet steps equal eager ones for every sampler, SD and SDXL, fp16;
#    the LoRA's batched casts under CUDA's autocast against autocast casting each weight; and a frozen
#    base with its norms held in fp32 (minidb/loop.py hold_frozen) against the all-bf16 one, bit for bit;
# 2. issue 13's last open target, the SDXL LoRA step at most 0.8x diffusers' time: diffusers + PEFT
#    (its adapters in fp32 as minidb's, and in bf16 as diffusers' script leaves them under bf16), minidb
#    eager, and minidb with its UNet forward and backward replayed as CUDA graphs, side by side in one
#    process and timed in turns, so that a drift within the process slows all alike
#    (bench/sdxl_lora_graph.py). minidb's eager step now launches 0.56x the kernels of diffusers + PEFT
#    with fp32 adapters, 0.71x with bf16 ones (bench/op_count.py, counted on the CPU, with the frozen
#    base's norms held in fp32 as train.py now holds them on CUDA; three sessions ago: 0.96x): this is
#    its first timing. If the graph wins by more, train.py's step is where it goes next;
# 3. the SDXL sampling row again, now that one recording serves every picture (sample.py's way);
# 4. last, so that running out of time loses only it: the checkpointed LoRA row, which swung most.
set -o pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L
# -o addopts="": pytest.ini asks for pytest-xdist workers, which the device machine lacks
echo "== GPU tests"; timeout 90 python3 -m pytest -o addopts="" tests/test_graphs.py -q -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -8
timeout 90 python3 -m pytest -o addopts="" tests/test_lora.py tests/test_sdxl_train.py -k "cast_at_once or holds_its_norms" -q -p no:cacheprovider 2>&1 | tee -a $OUT/tests.log | tail -3
echo "== SDXL LoRA step, eager and replayed"
timeout 210 python3 bench/sdxl_lora_graph.py --json $OUT/lora-graph.json 2>&1 | tee $OUT/lora-graph.log | tail -6
for row_runs_limit in sdxl-sample:5:75 sdxl-lora-step-gc:8:110; do
    IFS=: read row runs limit <<< "$row_runs_limit"
    echo "== $row"
    timeout $limit python3 bench/run.py --device cuda --rows $row --runs $runs --json $OUT/$row.json 2>&1 | tee -a $OUT/rows.log | grep -v "^|--" | tail -3 || echo "$row: failed or out of time"
done
echo "done in $(( $(date +%s) - start )) s"
