#!/usr/bin/env bash
# The GPU checks issues 13 and 15 still owed after the H200 calls of 2026-11-26, in one call of the
# device tool, within about 9 minutes (run from the repo root; $OUT collects the JSON and the logs):
#     run(command="bash bench/gpu_open.sh", carry=[".whl"], timeout_s=590)
# In order of what was never measured first:
#   1. issue 15: train.py under torchrun with one process against plain python (target: at most 3% slower);
#      LoRA at 512 px, so that each run writes megabytes, not full fine-tuning's 14 GB;
#   2. issue 13: the SDXL LoRA step with and without checkpointing, with more timed steps per process
#      than the earlier 5, whose diffusers figure moved from 0.38 to 0.59 s between two calls;
#   3. issue 13: SDXL sampling (target: 1.3x diffusers' speed), and what could bring it there: the
#      UNet forward in channels-last layout and under torch.compile (bench/sdxl_unet_variants.py).
# Each step has its own time limit, and the last gets what is left of the whole, so one step that runs
# long costs only itself. diffusers is carried as a wheel in .whl/; peft is in the machine's image.
set -o pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s); deadline=$((start + 560))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L; python3 -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
echo "== torchrun, one process"
timeout 170 python3 bench/torchrun_overhead.py --device cuda --method lora --steps 30 --rounds 2 --json $OUT/torchrun.json 2>&1 | tee $OUT/torchrun.log | tail -4
for row_runs_limit in sdxl-lora-step:15:90 sdxl-lora-step-gc:8:90 sdxl-sample:3:90; do
    IFS=: read row runs limit <<< "$row_runs_limit"
    echo "== $row ($runs timed runs)"
    timeout $limit python3 bench/run.py --device cuda --rows $row --runs $runs --json $OUT/$row.json 2>&1 | tee -a $OUT/sdxl.log | tail -3 || echo "$row: failed or out of time"
done
left=$((deadline - $(date +%s)))
echo "== SDXL UNet variants ($left s left)"
[ $left -gt 20 ] && timeout $left python3 bench/sdxl_unet_variants.py --json $OUT/variants.json 2>&1 | tee $OUT/variants.log | tail -8
echo "done in $(( $(date +%s) - start )) s"
