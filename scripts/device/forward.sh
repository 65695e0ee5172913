#!/usr/bin/env bash
# The forward-kernel experiment on the GPU machine (see ../shared/DEVICE.md in the
# planning docs): CUDA kernel grid, then the forward benchmark, then the PyTorch peers in
# the same command. Binaries are built beforehand and carried in .carry/:
#   cargo test  --release --features burn-attn/cuda --test cuda_kernel --no-run
#   cargo bench --features cuda --bench attention_forward --no-run
# Usage: scripts/device/forward.sh [grid|bench|memory|peers]... (default: all); logs and
# JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BIN=${BIN:-.carry}
PEERS=${PEERS:-.carry/torch_attention_bench.py}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(grid bench memory peers)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in "${steps[@]}"; do
  echo "== $step $(date +%T)"
  case $step in
    grid) CUBECL_AUTOTUNE_LEVEL=minimal timeout ${GRID_TIMEOUT:-240} "$BIN/cuda_kernel" --test-threads 4 --nocapture 2>&1 | tee "$OUT/grid.log" | grep -E "^test |panicked|FAILED|test result|out err.*inf" | head -80 ;;
    bench) for dt in bf16 f16 f32; do timeout 300 "$BIN/attention_forward" --backend cuda --dtype $dt --repeats 10 --json "$OUT/bench-$dt.json" 2>&1 | tee "$OUT/bench-$dt.log"; done ;;
    bench-bf16) timeout 300 "$BIN/attention_forward" --backend cuda --dtype bf16 --repeats 10 --json "$OUT/bench-bf16.json" 2>&1 | tee "$OUT/bench-bf16.log" ;;
    trace) BURN_ATTN_TRACE=1 CUBECL_DEBUG_LOG="$OUT/cubecl.log" timeout 120 "$BIN/attention_forward" --backend cuda --dtype bf16 --repeats 2 --skip-burn --only "n=4096 d=128 full" 2>&1 | sort | uniq -c | head -20
           BURN_ATTN_NO_MMA=1 BURN_ATTN_TRACE=1 timeout 120 "$BIN/attention_forward" --backend cuda --dtype bf16 --repeats 5 --skip-burn --only "n=4096 d=128 full" 2>&1 | sort | uniq -c | head ;;
    ptxas) # register and spill counts of the matrix-unit kernel compiled in the trace step
           awk '/FlashMmaKernel</{f=1} f&&/^```cpp/{p=1;next} p&&/^```$/{exit} p' "$OUT/cubecl.log" > "$OUT/flash_mma.cu"
           python3 scripts/device/ptxas_stats.py "$OUT/flash_mma.cu" 2>&1 | grep -E "ptxas|spill|Used|local" ;;
    memory) timeout 120 "$BIN/attention_forward" --backend cuda --dtype bf16 --memory 2>&1 | tee "$OUT/memory.log" ;;
    peers) timeout 400 python3 "$PEERS" "$OUT/torch.json" 2>&1 | tee "$OUT/torch.log" | grep -E "bfloat16|flex|float32" | head -60 ;;
    *) echo "unknown step $step" ;;
  esac
done
