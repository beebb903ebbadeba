#!/usr/bin/env bash
# SDXL's GPU rows of bench/run.py in one call of the device tool, about 4 minutes on an H200 (run from
# the repo root with .whl carried; $OUT collects one JSON per row and the log):
#     run(command="bash bench/gpu_sdxl.sh", carry=[".whl"], timeout_s=480)
# Each row is its own run.py call with its own time limit, so a row that runs long costs only itself
# and the rows before it keep their figures. Order: what the issue asks first (the UNet at 1024 px, LoRA
# training with checkpointing against its 16 GB target), then train.py itself at 1024 px; the 6.9 GB file load
# is measured on the CPU (bench/run.py --rows sdxl-load), where RSS is what counts.
# diffusers is carried as a wheel in .whl/ (the GPU machine cannot download); peft is in its image.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L; python3 -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
for row_limit in sdxl-unet:50 sdxl-lora-step-gc:70 sdxl-sample:80 train:130 sdxl-lora-step:60; do
    row=${row_limit%%:*}
    echo "== $row"
    if [ $row = train ]; then  # train.py itself at 1024 px: the 16 GB target (bench/sdxl_train_gpu.py)
        timeout ${row_limit##*:} python3 bench/sdxl_train_gpu.py --json $OUT/train.json 2>&1 | grep -v "it/s\]" | tee -a $OUT/sdxl.log | tail -20 || echo "$row: failed or out of time"
        continue
    fi
    timeout ${row_limit##*:} python3 bench/run.py --device cuda --rows $row --json $OUT/$row.json 2>&1 | tee -a $OUT/sdxl.log || echo "$row: failed or out of time"
done
df -h /tmp | tail -1  # the load row's 6.9 GB file is gone
