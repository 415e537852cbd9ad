#!/usr/bin/env bash
# Every GPU check and figure of issue 16 in one run, for the few minutes a GPU machine is lent.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on an H100/H200: SD 1.5 shapes (random weights), 512 px
#   bash benchmarks/gpu_suite.sh OUT_DIR --smoke    # on a CPU: the same steps on the tiny model at 64 px
#
# Steps, in order, each under its own time limit (590 s in all, inside one 600 s device command); a
# step that fails or runs out of time is recorded and the next one runs:
#   1. the device: nvidia-smi, torch's CUDA build;
#   2. the CUDA-only tests (they skip on a CPU);
#   3. detection_speed.py, float32, with --tta_latent: 10x the published way? the capture's share;
#   4. discovery_speed.py, float32 (no Ray Train scaling: it needs Ray);
#   5. flops.py on the timings of 3 and 4: the fraction of the FLOP limit;
#   6. detection_speed.py, bfloat16: speed, and its keypoints against float32 on the same model;
#   7. ldm_correspondence.py (SPEC 3), float16: batched against one point at a time.
# It needs torch, diffusers, transformers, numpy, pyarrow, Pillow and pytest, not Ray: the
# pipeline and serving benchmarks are not in it.
#
# Writes to OUT_DIR: each step's log and JSON, RESULTS-new.md (the sections the benchmarks added to
# benchmarks/RESULTS.md during this run: append them to the checkout's copy) and summary.txt (each
# step's exit status and seconds). Smoke runs add nothing to RESULTS.md.

set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR [--smoke]}
smoke=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # skp_ray from this checkout

# Each benchmark's own options beside the shared ones; on the GPU their defaults.
detection=() discovery=() flops=() correspondence=(--dtype float16)
if [ "$smoke" = "--smoke" ]; then
    shared=(--model tiny --image_size 64 --device cpu --repeats 1 --threads 1 --no_results)
    shape=("${shared[@]}" --no_warm_up)
    detection=(--images 1 --augmentations 2)
    discovery=(--batch_size 2)
    flops=(--augmentations 2 --batch_size 2 --peak_side 512)
    correspondence=(--points 1 --restarts 2 --steps 1 --passes 2)
else
    shared=(--model sd15 --image_size 512 --device cuda --repeats 3)
    shape=("${shared[@]}")
fi

results_before=$(wc -l < benchmarks/RESULTS.md)
: > "$out/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...: run it, log to OUT_DIR/NAME.log, record its status and time
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    echo "== $name: $*"
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    local status=$?
    local line="$name: exit $status after $((SECONDS - started)) s (limit $seconds s)"
    echo "$line" | tee -a "$out/summary.txt"
    tail -n 4 "$out/$name.log"
}

step device 20 bash -c "nvidia-smi || echo 'no nvidia-smi here'; $python -c 'import torch, diffusers; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \
\"diffusers\", diffusers.__version__)'"
step cuda_tests 90 "$python" -m pytest -q -p no:cacheprovider \
    "tests/test_attention.py::test_half_precision_maps_on_gpu_match_cpu" \
    "tests/test_matching.py::test_matching_on_gpu_equals_cpu" \
    "tests/test_dift.py::test_float16_on_cuda_replays_cpu_drawn_noise_exactly"
step detection_float32 110 "$python" benchmarks/detection_speed.py "${shape[@]}" "${detection[@]}" \
    --tta_latent --output "$out/detection_float32.json"
step discovery_float32 110 "$python" benchmarks/discovery_speed.py "${shape[@]}" "${discovery[@]}" \
    --workers --output "$out/discovery_float32.json"
step flops 80 "$python" benchmarks/flops.py "${shape[@]}" "${flops[@]}" \
    --timings "$out/detection_float32.json" "$out/discovery_float32.json" --output "$out/flops.json"
step detection_bfloat16 110 "$python" benchmarks/detection_speed.py "${shape[@]}" "${detection[@]}" \
    --dtype bfloat16 --output "$out/detection_bfloat16.json"
step ldm_correspondence 70 "$python" benchmarks/ldm_correspondence.py "${shared[@]}" "${correspondence[@]}" \
    --output "$out/ldm_correspondence.json"

tail -n +"$((results_before + 1))" benchmarks/RESULTS.md > "$out/RESULTS-new.md"
echo "== done: $out/summary.txt"
cat "$out/summary.txt"
