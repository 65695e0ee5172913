#!/usr/bin/env bash
# One lease, in priority order: memcheck of the matrix-unit kernel, the bf16 forward bench
# (ours vs Burn's fused and materialised), the PyTorch peers, the memory case, f32, and the
# comparison tool on CUDA with the peers' JSON. Logs under $OUT.
set -uo pipefail
B=${BIN:-/tmp/bin}
S=/usr/local/cuda/bin/compute-sanitizer
echo "== memcheck $(date +%T)"
timeout 40 $S --tool memcheck --print-limit 3 "$B/attention_forward" --backend cuda --dtype bf16 --repeats 1 --only "n=1024" --skip-burn 2>&1 | grep -E "ERROR SUMMARY|Invalid|ours" | head
echo "== bench bf16 $(date +%T)"
timeout 110 "$B/attention_forward" --backend cuda --dtype bf16 --repeats 10 --json "$OUT/bench-bf16.json" 2>&1 | tee "$OUT/bench-bf16.log"
echo "== peers $(date +%T)"
# The peer script's own functions, bf16 and the window cases only (time budget).
timeout 150 python3 -c "
import json, torch
src = open('.carry/torch_attention_bench.py').read().split('if __name__')[0]
exec(src)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
run_sdpa([1024, 4096, 16384], [torch.bfloat16])
run_flex([16384], [256, 1024])
json.dump(res, open('$OUT/torch.json', 'w'), indent=1)
" > "$OUT/torch.log" 2>&1; grep -E "bfloat16 .*d=128|flex" "$OUT/torch.log" | grep -E "flash|cudnn|flex" | head -30
echo "== memory $(date +%T)"
timeout 40 "$B/attention_forward" --backend cuda --dtype bf16 --memory 2>&1 | tee "$OUT/memory.log"
echo "== f32 $(date +%T)"
timeout 40 "$B/attention_forward" --backend cuda --dtype f32 --repeats 5 --only "n=4096" 2>&1 | tee "$OUT/bench-f32.log"
echo "== compare $(date +%T)"
timeout 90 "$B/burn-attn-bench" compare --backend cuda --dtype bf16 --tokens 32768 --lengths 1024,4096 --heads 16 --head-dim 128 --repeats 5 --no-progress --peers "$OUT/torch.json" --out-dir "$OUT/compare" 2>&1 | tee "$OUT/compare.log" | tail -40
echo "== done $(date +%T)"
