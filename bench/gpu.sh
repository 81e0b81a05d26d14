#!/usr/bin/env bash
# MoCo v3 ResNet-50 and ViT-S/16 +/- BatchFormer on ONE GPU: images/s and peak memory, in under 8
# minutes on an H100. ResNet-50, 224 px, batch 256 per GPU, bf16 through `accelerate launch
# --mixed_precision bf16`, channels_last (train.py's choice on CUDA), BatchFormer off (--add_bf 0)
# and on (--add_bf 1):
#   1. synthetic: the bare step on random views already on the GPU (bench/reference_step.py),
#      without and with cudnn.benchmark (train.py sets it on CUDA); then ViT-S/16 at 224 px,
#      batch 128 per GPU (MoCo v3 trains it at 1024 on 8 GPUs), AdamW, BatchFormer off and on;
#   2. decoded JPEGs: train.py itself on a generated 256 px JPEG folder (PIL views in the loader
#      workers), and with the batched tensor augmentation (--augment batched);
#   3. a short train.py run that counts host synchronisations by source line (sync debug mode);
#   4. the batched augmentation alone on the GPU (views/s at 224 px).
#
#   bench/gpu.sh            # on the GPU machine (one GPU)
#   bench/gpu.sh --tiny     # the same sequence on a CPU at toy size (ResNet-18 small stem, 32 px, batch 16);
#                           # make test-e2e runs it (tests/test_gpu_script.py): 2 min 21 s of CPU; 5 min 53 s of wall-clock
#                           # on 2 cores shared at load average 4.3 (2026-12-07)
#   COMPILE=1 bench/gpu.sh  # adds the bare step and the augmentation under torch.compile (minutes of compiling)
# Every measurement prints one JSON line; all of them land in $OUT/results.jsonl, the full log in
# $OUT/log.txt, and a table at the end. OUT defaults to bench-results/gpu (or bench-results/gpu-tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
if [[ "${1:-}" == "--tiny" ]]; then
    OUT=${OUT:-bench-results/gpu-tiny}
    ARCH=resnet18 STEM=small SIZE=32 SOURCE=32 BATCH=16 MLP=512 IMAGES=128 WORKERS=1 WARMUP=2 STEPS=4 LOG=2
    VIT=(--arch vit_tiny --size 32 --patch-size 8 --batch 8 --mlp-dim 256)
    LAUNCH=(--cpu --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    SYNTH_STEPS=(--warmup 1 --steps 2)
    export OMP_NUM_THREADS=1  # two threads beside the loader worker stall each other on a 2-core box
else
    OUT=${OUT:-bench-results/gpu}
    ARCH=resnet50 STEM=imagenet SIZE=224 SOURCE=256 BATCH=256 MLP=4096 IMAGES=8192 WARMUP=10 STEPS=30 LOG=10
    VIT=(--arch vit_small --size 224 --patch-size 16 --batch 128 --mlp-dim 4096)
    WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
    LAUNCH=(--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    SYNTH_STEPS=(--warmup 10 --steps 30)
fi
rm -rf "$OUT" && mkdir -p "$OUT"
START=$SECONDS
say() { echo "[gpu.sh +$(( SECONDS - START ))s] $*" | tee -a "$OUT/log.txt"; }
# Run a command, keep its output in the log, and its JSON lines in results.jsonl.
record() { "$@" 2>&1 | tee -a "$OUT/log.txt" | { grep '^{' || true; } | tee -a "$OUT/results.jsonl"; }

say "$(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"

say "generating $IMAGES JPEGs of ${SOURCE}px"
record "$BIN/python" bench/gpu_throughput.py jpegs "$OUT/data" --count "$IMAGES" --size "$SOURCE"

say "1. synthetic views, bare step, BatchFormer off and on"
SYNTH=(bench/gpu_throughput.py synthetic --arch "$ARCH" --stem "$STEM" --size "$SIZE" --batch "$BATCH" --mlp-dim "$MLP" "${SYNTH_STEPS[@]}")
record "$BIN/accelerate" launch "${LAUNCH[@]}" "${SYNTH[@]}"
record "$BIN/accelerate" launch "${LAUNCH[@]}" "${SYNTH[@]}" --cudnn-benchmark
if [[ "${COMPILE:-0}" == 1 ]]; then
    record "$BIN/accelerate" launch "${LAUNCH[@]}" "${SYNTH[@]}" --cudnn-benchmark --compile
fi
say "1b. synthetic views, bare step, ViT (${VIT[*]}), BatchFormer off and on"
record "$BIN/accelerate" launch "${LAUNCH[@]}" bench/gpu_throughput.py synthetic "${VIT[@]}" "${SYNTH_STEPS[@]}"

TRAIN=(-a "$ARCH" --stem "$STEM" --image-size "$SIZE" -b "$BATCH" --moco-mlp-dim "$MLP" --workers "$WORKERS"
       --log-every "$LOG" --max-steps $(( WARMUP + STEPS )) --epochs 100 --warmup-epochs 10 --resume none)
trainer() {  # trainer NAME [train.py options...]
    local name=$1; shift
    record "$BIN/accelerate" launch "${LAUNCH[@]}" bench/gpu_throughput.py trainer --batch "$BATCH" --warmup "$WARMUP" \
        -- --data "$OUT/data" --output-dir "$OUT/run-$name" "${TRAIN[@]}" "$@"
    rm -rf "$OUT/run-$name/checkpoints"
}
say "2. decoded JPEGs through train.py, PIL views in $WORKERS loader workers"
trainer pil-bf0 --add_bf 0
trainer pil-bf1 --add_bf 1
say "2b. decoded JPEGs through train.py, batched tensor views on the device"
trainer batched-bf1 --add_bf 1 --augment batched

say "3. host synchronisations inside the step (expected: only at log/save steps)"
record "$BIN/accelerate" launch "${LAUNCH[@]}" bench/gpu_throughput.py trainer --sync-check --batch "$BATCH" --warmup 2 \
    -- --data "$OUT/data" --output-dir "$OUT/run-sync" "${TRAIN[@]}" --max-steps 6 --log-every 3 --add_bf 1

say "4. batched augmentation alone (COMPILE=1: also torch.compile'd)"
record "$BIN/python" bench/gpu_throughput.py augment --size "$SIZE" --batch "$BATCH" $([[ "${COMPILE:-0}" == 1 ]] && echo --compile)

rm -rf "$OUT/data" "$OUT"/run-*/checkpoints
say "done in $(( SECONDS - START ))s; table:"
"$BIN/python" - "$OUT/results.jsonl" <<'EOF' | tee -a "$OUT/log.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["mode"] == "synthetic":
        extra = " +cudnn.benchmark" * r["cudnn_benchmark"] + " +compile" * r["compile"]
        phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_ms"].items())
        print(f"bare step, synthetic views, {r['arch']} {r['size']}px b{r['batch']} {r['precision']}, BF {r['bf']}{extra}: "
              f"{r['img_per_s']:.1f} img/s, {r['memory']} {r['peak_memory_gib']:.2f} GiB; ms: {phases}")
    elif r["mode"] == "trainer":
        bf = "on" if "--add_bf 1" in r["args"] else "off"
        aug = "batched" if "--augment batched" in r["args"] else "PIL"
        line = (f"train.py, JPEGs, {aug} views, BF {bf}: {r['img_per_s']:.1f} img/s (steps {r['steps'][0]}-{r['steps'][1]}, "
                f"data wait {r['data_wait_s'] * 1000:.0f} ms/step), {r['memory']} {r['peak_memory_gib']:.2f} GiB")
        print(line + (f"; host syncs by line: {r['host_syncs_by_line']}" if "host_syncs_by_line" in r else ""))
    elif r["mode"] == "augment":
        print(f"batched augmentation alone on {r['device']}, {r['size']}px b{r['batch']}{' compiled' * r['compile']}: "
              f"{r['views_per_s']:.0f} views/s, {r['ms_per_batch']:.1f} ms per batch")
EOF
