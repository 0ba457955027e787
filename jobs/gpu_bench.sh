#!/usr/bin/env bash
# The pure-torch core timed on a GPU: capability-subspace extraction in bf16 against the paper's
# way, decoding with the projection folded into the weights against unprojected, and stage 2's
# seeded sampler against Hugging Face `generate` at batch 64 and 256, on a randomly initialised
# model of Qwen2.5-0.5B's shape (24 layers, bf16). Costs depend on shapes, not weight values.
# It needs torch, transformers and peft only (no Ray, DeepSpeed, datasets or network), so it
# runs on a bare accelerator machine from a checkout:
#   bash jobs/gpu_bench.sh                                    # cuda, about 3-5 minutes on one GPU
#   DEVICE=cpu DTYPE=float32 LAYERS=2 bash jobs/gpu_bench.sh --repeats 1 --decode-repeats 2 \
#     --n-calibration 5 --new-tokens 8 --stream-prompts 24 --sample-batch 8 --batch 8
#                              # a dry run of every part on CPU: 140 s on 2 cores (its figures
#                              # mean nothing at that size: results/gpu_bench_cpu_dry_run.log)
# Extra arguments go to every jobs/bench.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # images without `python`
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
LAYERS=${LAYERS:-24}
bench() {
  "$PYTHON" jobs/bench.py --model-size qwen2.5-0.5b --layers "$LAYERS" --device "$DEVICE" \
    --dtype "$DTYPE" --threads 0 "$@"
}
bench --parts extract,decode,sample --sample-batch 64 "$@"
bench --parts sample --sample-batch 256 "$@"
