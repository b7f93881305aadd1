#!/usr/bin/env bash
# The MM-DiT speed rows on a GPU machine, as one prepared script (bf16, 512 and 1024 px, 20 steps).
#
# Prepare here (the GPU image lacks diffusers and open_clip; nothing can be downloaded there):
#   pip download --no-deps -d wheels diffusers==0.42.1 open_clip_torch   # wheels/ is git-ignored: carry it
# Then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_mmdit.sh            # results in $OUT (or benchmarks/results/) as tokenprune_mmdit_gpu_*.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-index wheels/*.whl
out="${OUT:-benchmarks/results}"
for family in sd3 flux; do
  PYTHONPATH="$PWD:$PWD/benchmarks" python benchmarks/mmdit_bench.py --family "$family" --device cuda --dtype bfloat16 \
    --size 512 1024 --steps 20 --repeats 3 --pairs 10 --prompts short --out "$out/tokenprune_mmdit_gpu_$family"
done
