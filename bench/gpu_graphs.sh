#!/usr/bin/env bash
# Sampling with the UNet replayed as a CUDA graph (minidb/graphs.py), in one call of the device tool of
# at most 4.5 minutes (run from the repo root; $OUT collects the JSON and the logs):
#     run(command="bash bench/gpu_graphs.sh", carry=[".whl"], timeout_s=280)
# 1. tests/test_graphs.py on the GPU: replayed steps equal eager ones (every sampler, SD and SDXL, fp16);
# 2. SDXL's UNet step in one process: diffusers eager, minidb eager, minidb replayed (sdxl_unet_variants.py);
# 3. the sampling rows of bench/run.py, where minidb now replays: SDXL at 1024 px, SD 1.5 at 512 px.
set -o pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L
echo "== GPU tests"; timeout 60 python3 -m pytest -o addopts="" tests/test_graphs.py -q -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -6
echo "== SDXL UNet step"; timeout 70 python3 bench/sdxl_unet_variants.py --variants diffusers minidb cuda_graph --json $OUT/variants.json 2>&1 | tee $OUT/variants.log | tail -4
for row_runs_limit in sdxl-sample:5:75 sample:3:55; do
    IFS=: read row runs limit <<< "$row_runs_limit"
    echo "== $row"
    timeout $limit python3 bench/run.py --device cuda --rows $row --runs $runs --json $OUT/$row.json 2>&1 | tee -a $OUT/rows.log | grep -v "^|--" | tail -3 || echo "$row: failed or out of time"
done
echo "done in $(( $(date +%s) - start )) s"
