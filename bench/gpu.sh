#!/usr/bin/env bash
# The GPU work in one call of the device tool (run from the repo root; $OUT collects the logs):
# the GPU tests, then bench/attention.py, bench/train_memory.py and bench/run.py, each bounded in time.
# diffusers is carried as a wheel in .whl/ (the GPU machine cannot download).
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L; python3 -c "import torch, triton, diffusers, transformers; print(torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())"
echo "== GPU tests"; timeout 170 python3 -m pytest -o addopts="" tests/test_flash_attention.py -q -p no:cacheprovider -x 2>&1 | tee $OUT/tests.log | tail -15
echo "== attention"; timeout 100 python3 bench/attention.py --reps 20 --out $OUT/attention.json 2>&1 | tee $OUT/attention.log | tail -25
echo "== train memory"; timeout 130 python3 bench/train_memory.py --device cuda 2>&1 | tee $OUT/train_memory.log | tail -12
echo "== run"; timeout 170 python3 bench/run.py --device cuda --rows unet-64 train-step sample vae-decode-512 load unet-32 vae-encode-512 --json $OUT/results-cuda.json 2>&1 | tee $OUT/run.log | tail -20
