#!/usr/bin/env bash
# The H200 steps of one lease, each bounded so that a 10-minute device command holds a
# group of them (see docs/PERFORMANCE.md for what each measured). Binaries are built here
# first and carried in .carry/bins.tar.xz:
#   cargo test  --release --features burn-attn/cuda --test cuda_kernel --no-run
#   cargo bench --features cuda --bench attention_forward --no-run
#   cargo build --release -p burn-attn-bench --features cuda
#   cargo build --release --example associative_recall --features cuda
# On the device: mkdir -p /tmp/bin && tar -xJf .carry/bins.tar.xz -C /tmp/bin, then
#   BIN=/tmp/bin OUT=$OUT bash scripts/device/lease.sh STEP...
# Steps: ptxas ncu ncu-source durations peer-durations host-gap host-split memcheck memcheck-backward tune grid bench peers memory backward sanitize-backward
# memory-train portable f32 tf32 wgpu train compare save-cache. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
B=${BIN:-/tmp/bin}
PEERS=${PEERS:-.carry/torch_attention_bench.py}
S=/usr/local/cuda/bin/compute-sanitizer
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
AF="$B/attention_forward --backend cuda --dtype bf16"
# CubeCL's kernel (PTX) and autotune caches on disk, so later calls of a lease, and later
# leases that carry .carry/cubecl-cache.tar.xz (written by the save-cache step), skip
# Burn's first-call compilation and tuning (about a minute per new shape on the H200).
# CubeCL keys a cached kernel by its type name and launch configuration, not by its source:
# two builds of this crate share entries, so a kernel changed since the cache was filled
# runs its OLD code (a lease measured one build's PTX under another's name that way). Each
# binary folder therefore gets its own cache, and the carried one (filled by the binaries
# it was saved with) is restored only on request (CACHE_RESTORE=1, same binaries only).
cache_dir() { echo "/tmp/cubecl-cache-$(echo "$1" | tr '/' '_')"; }
CACHE=$(cache_dir "$B")
if [ ! -d "$CACHE" ]; then
  mkdir -p "$CACHE"
  [ "${CACHE_RESTORE:-0}" = 1 ] && [ -f .carry/cubecl-cache.tar.xz ] && tar -xJf .carry/cubecl-cache.tar.xz -C "$CACHE"
fi
# The test binary gets a cache of its own: kernels it compiled and cached ran 5% slower
# under the bench's name (a lease timed the bench at 1.20 ms where a fresh compile of the
# same source ran 1.14 ms, identical SASS offline), so a `grid` before `durations` no
# longer feeds the bench its kernels.
TEST_CACHE=$CACHE-tests
cache_toml() { printf '[compilation]\ncache = { file = "%s" }\n[autotune]\ncache = { file = "%s" }\n' "$1" "$1" > cubecl.toml; }
# Runs a command with cache $1, then points cubecl.toml back at the bench's cache.
with_cache() { local dir=$1; shift; mkdir -p "$dir"; cache_toml "$dir"; "$@"; local rc=$?; cache_toml "$CACHE"; return $rc; }
cache_toml "$CACHE"
for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    ptxas) # registers, spills and SASS of the matrix-unit kernel as the default launch compiles it;
      # PTXAS_ONLY picks the bench case (e.g. "window 256": the narrow-band compilation)
      rm -f "$OUT/cubecl.log"
      # (an empty kernel cache: a cached kernel is not compiled, so not logged)
      rm -rf /tmp/cubecl-cache-ptxas
      with_cache /tmp/cubecl-cache-ptxas env BURN_ATTN_TRACE=1 CUBECL_DEBUG_LOG="$OUT/cubecl.log" timeout 60 $AF --repeats 1 --skip-burn --only "${PTXAS_ONLY:-n=1024 d=128 full}" 2>&1 | sort | uniq -c | head
      # PTXAS_TAG names the files (flash_mma$PTXAS_TAG.cu/.sass: source and SASS with its opcode counts)
      awk '/FlashMmaKernel</{f=1} f&&/^```cpp/{p=1;next} p&&/^```$/{exit} p' "$OUT/cubecl.log" > "$OUT/flash_mma${PTXAS_TAG:-}.cu"
      timeout 60 python3 scripts/device/ptxas_stats.py "$OUT/flash_mma${PTXAS_TAG:-}.cu" 2>&1 | grep -E "ptxas|spill|Used|error|sass" | head ;;
    ncu) # Nsight Compute on one launch of each matrix-unit kernel at n=4096 d=128 (bf16):
      # throughput, warp stall reasons, occupancy, instruction mix -- where the time goes
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; else
        sec="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis"
        timeout ${NCU_TIMEOUT:-150} $NCU -k regex:flash_mma_kernel --launch-skip 1 --launch-count 1 $sec $AF --repeats 1 --skip-burn --only "n=4096 d=128 full" > "$OUT/ncu-forward.txt" 2>&1
        timeout ${NCU_TIMEOUT:-150} $NCU -k regex:flash_mma_backward --launch-skip 2 --launch-count 2 $sec $AF --backward --repeats 1 --skip-burn --only "n=4096 d=128 full" > "$OUT/ncu-backward.txt" 2>&1
        for f in "$OUT/ncu-forward.txt" "$OUT/ncu-backward.txt"; do echo "-- $f"; grep -E "==PROF==|ERR|flash_mma|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|Stall|L1/TEX Hit|Shared" "$f" | head -40; done
      fi ;;
    ncu-source) # where the forward's warps stall, per SASS instruction: Nsight Compute's
      # source counters (stall samples by reason) for one launch of NCU_CASE (default the
      # n=4096 full case; e.g. "window 1024"), exported as CSV (the report stays on the device)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; else
        timeout ${NCU_TIMEOUT:-150} $NCU -k regex:flash_mma_kernel --launch-skip 1 --launch-count 1 --section SourceCounters --section WarpStateStats -f -o /tmp/ncu-source $AF --repeats 1 --skip-burn --only "${NCU_CASE:-n=4096 d=128 full}" > "$OUT/ncu-source.log" 2>&1
        $NCU --import /tmp/ncu-source.ncu-rep --page source --csv --print-source sass > "$OUT/ncu-source.csv" 2>&1
        $NCU --import /tmp/ncu-source.ncu-rep --page details --print-details all > "$OUT/ncu-stalls.txt" 2>&1
        tail -3 "$OUT/ncu-source.log"; wc -l "$OUT/ncu-source.csv"; grep -iE "stall" "$OUT/ncu-stalls.txt" | head -30
      fi ;;
    durations) # kernel times under Nsight Compute (clocks locked, one launch at a time: runs
      # of one binary agree within 1%, where wall-clock medians of one-millisecond kernels
      # moved 13%), for each binary folder of DURATION_BINS (default $B) in turn, each with
      # its own kernel cache; DURATION_CASES: "|"-separated bench cases. The backward:
      # DURATION_KERNEL=flash_mma_backward DURATION_ARGS=--backward (the dQ and dK/dV
      # kernels alternate in the list). DURATION_VARIANTS: tuning variants as TUNE_VARIANTS
      # (space separated, a variant's variables joined by commas, "default" = none).
      # The tf32 forward: DURATION_DTYPE=f32 DURATION_KERNEL=flash_tf32 with a variant
      # setting BURN_ATTN_TF32=1 (e.g. "BURN_ATTN_TF32=1 BURN_ATTN_TF32=1,BURN_ATTN_TF32_BLOCK_K=64")
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; else
        IFS='|' read -ra cases <<< "${DURATION_CASES:-n=1024 d=128 full|n=1024 d=128 causal|n=4096 d=128 full|n=4096 d=128 causal}"
        for case in "${cases[@]}"; do
          for bin in ${DURATION_BINS:-$B}; do
            cache_toml "$(cache_dir "$bin")"
            for v in ${DURATION_VARIANTS:-default}; do
              vars=${v//,/ }; [ "$v" = default ] && vars=
              d=$(env $vars timeout 60 $NCU -k regex:${DURATION_KERNEL:-flash_mma_kernel} --launch-skip 2 --launch-count 6 --metrics gpu__time_duration.sum "$bin/attention_forward" --backend cuda --dtype ${DURATION_DTYPE:-bf16} --repeats 4 --skip-burn ${DURATION_ARGS:-} --only "$case" 2>&1 | awk '/gpu__time_duration/ {print $(NF-1), $NF}' | tr '\n' ' ')
              echo "$case [$bin] [$v]: $d"
            done
          done
        done
        cache_toml "$CACHE"
      fi ;;
    peer-durations) # the peers' kernel times under Nsight Compute, as `durations` times
      # ours (locked clocks, kernel only: no launch gaps, no host work), so that the ratio
      # compares kernels: SDPA's flash backend (FlashAttention-2) and FlexAttention's
      # windows. PEER_CASES: "|"-separated "kind n arg" (scripts/device/peer_kernel.py)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; else
        IFS='|' read -ra cases <<< "${PEER_CASES:-flash 1024 0|flash 1024 1|flash 4096 0|flash 4096 1|flash 16384 0|flash 16384 1|flex-sym 16384 1024|flex-sym 16384 256|flex-causal 16384 1024}"
        for case in "${cases[@]}"; do
          d=$(timeout 150 $NCU -k regex:"flash_fwd|triton_tem" --print-kernel-base function --launch-skip 3 --launch-count 4 --metrics gpu__time_duration.sum python3 scripts/device/peer_kernel.py $case 2>&1 | awk '/\(([0-9]+, )+[0-9]+\)x\(/ {name=substr($1, 1, 24)} /gpu__time_duration/ {print name, $(NF-1), $NF}' | tr '\n' ' ')
          echo "peer $case: $d"
        done
        # Which matrix instructions FlexAttention's Triton kernels use (Hopper's wgmma or
        # the mma.sync ours and FA2 use): their PTX in Triton's cache (Inductor's, by default
        # under /tmp/torchinductor_$USER/triton, or Triton's own)
        ptx=$(grep -rl "triton_tem_fused" ${TRITON_CACHE_DIR:-} /tmp/torchinductor_$(whoami)/triton ~/.triton/cache --include='*.ptx' 2>/dev/null | head -4)
        [ -z "$ptx" ] && echo "no FlexAttention PTX found"
        for f in $ptx; do
          echo "flex ptx $(basename "$f"): wgmma $(grep -c 'wgmma.mma_async' "$f"), mma.sync $(grep -c 'mma.sync' "$f"), cp.async.bulk (TMA) $(grep -c 'cp.async.bulk' "$f")"
        done
      fi ;;
    host-gap) # where a single call's time beyond its kernel goes (0.1-0.24 ms at the short
      # cases: bench --calls 1 against --calls 20): Nsight Systems' CUDA API, kernel and OS
      # runtime summaries of one short case timed one call at a time. The capture spans the
      # whole process (warm-up, and compilation on a cold kernel cache: run it after a step
      # that ran the case with this binary), so read the counts per call, not the totals.
      NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
      if [ -z "$NSYS" ]; then echo "no nsys on this machine"; else
        timeout 120 $NSYS profile -f true -o /tmp/host-gap --trace=cuda,osrt $AF --repeats 20 --skip-burn --only "${GAP_CASE:-n=16384 d=128 window 256}" > "$OUT/host-gap.log" 2>&1
        timeout 120 "$NSYS" stats --force-export=true -f csv -o "$OUT/host-gap" --report cuda_api_sum --report cuda_gpu_kern_sum --report osrt_sum /tmp/host-gap.nsys-rep >> "$OUT/host-gap.log" 2>&1
        tail -5 "$OUT/host-gap.log"; for f in "$OUT"/host-gap*.csv; do echo "-- $f"; head -12 "$f"; done
      fi ;;
    host-split) # a single call's time beyond its kernel (0.1-0.24 ms at the short cases),
      # with and without Burn's fusion stream: bench --calls 1 and --calls 20 on `cuda` and
      # on `cuda-unfused` (Burn's CubeBackend itself); SPLIT_ONLY picks the cases
      for be in cuda cuda-unfused; do for k in 1 20; do
        timeout 120 "$B/attention_forward" --backend $be --dtype bf16 --repeats 20 --calls $k --skip-burn --only "${SPLIT_ONLY:-n=1024 d=128}" 2>&1 | grep -E "ours|panicked|error" | sed "s/^/[$be K=$k] /"
      done; done ;;
    memcheck) # the default (asynchronous) configuration and the 8-plane one
      timeout 60 $S --tool memcheck --print-limit 3 $AF --repeats 1 --only "n=1024" --skip-burn 2>&1 | grep -E "ERROR SUMMARY|Invalid|ours" | head
      BURN_ATTN_MMA_PLANES=8 timeout 40 $S --tool memcheck --print-limit 3 $AF --repeats 1 --only "n=1024 d=128 causal" --skip-burn 2>&1 | grep -E "ERROR SUMMARY|Invalid|ours" | head ;;
    memcheck-backward) # the backward kernel tests alone, one thread (a fault is sticky to the context)
      with_cache "$TEST_CACHE" timeout ${MEMCHECK_TIMEOUT:-300} $S --tool memcheck --print-limit 5 "$B/cuda_kernel" backward --test-threads 1 2>&1 | grep -E "ERROR SUMMARY|Invalid|at 0x|^test |panicked" | head -40 ;;
    tune) # staging, planes and key-tile variants at n=4096, d=128 (TUNE_ONLY: other cases; TUNE_REPEATS:
      # one-millisecond cases moved 13% between runs of one binary at 10); TUNE_VARIANTS: space
      # separated, the variables of one variant joined by commas ("default" = none)
      for v in ${TUNE_VARIANTS:-default BURN_ATTN_MMA_SYNC=1 BURN_ATTN_MMA_PLANES=8 BURN_ATTN_MMA_BLOCK_K=64 BURN_ATTN_MMA_BLOCK_K=16 BURN_ATTN_MMA_PLANES=8,BURN_ATTN_MMA_BLOCK_K=64}; do
        echo "-- variant [$v]"
        vars=${v//,/ }; [ "$v" = default ] && vars=
        env $vars timeout ${TUNE_TIMEOUT:-40} $AF --repeats ${TUNE_REPEATS:-10} --skip-burn --only "${TUNE_ONLY:-n=4096 d=128}" 2>&1 | grep -E "ours|error|panick" | head -12
      done ;;
    grid) # GRID_ARGS: extra test-binary arguments, e.g. "--skip within_thrice" (Burn's slow device reference)
      with_cache "$TEST_CACHE" env CUBECL_AUTOTUNE_LEVEL=minimal timeout ${GRID_TIMEOUT:-200} "$B/cuda_kernel" --test-threads 4 --nocapture ${GRID_ARGS:-} 2>&1 | tee "$OUT/grid.log" | grep -E "^test |panicked|FAILED|test result" | head -40
      echo "cases checked: $(grep -cE 'out err' "$OUT/grid.log")"; grep -E "out err" "$OUT/grid.log" | tail -3 ;;
    bench) timeout ${BENCH_TIMEOUT:-300} $AF --repeats 10 ${BENCH_ARGS:-} --json "$OUT/bench-bf16.json" 2>&1 | tee "$OUT/bench-bf16.log" ;;
    peers) # the peer script's own functions: bf16 SDPA and the FlexAttention windows
      timeout 200 python3 -c "
import json, torch
src = open('$PEERS').read().split('if __name__')[0]
exec(src)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
run_sdpa([1024, 4096, 16384], [torch.bfloat16])
run_flex([16384], [256, 1024])
json.dump(res, open('$OUT/torch.json', 'w'), indent=1)
" > "$OUT/torch.log" 2>&1; grep -E "bfloat16 .*d=128|flex" "$OUT/torch.log" | grep -E "flash|cudnn|flex|math" | head -30 ;;
    memory) timeout 60 "$B/attention_forward" --backend cuda --dtype bf16 --memory 2>&1 | tee "$OUT/memory.log" ;;
    backward) # training steps: our backward vs Burn's materialised autodiff (n <= 4096)
      timeout ${BACKWARD_TIMEOUT:-300} $AF --backward --repeats 5 ${BACKWARD_ARGS:-} --json "$OUT/backward-bf16.json" 2>&1 | tee "$OUT/backward-bf16.log" ;;
    sanitize-backward) # memcheck and racecheck of the matrix-unit backward (asynchronous
      # staging, the default) on the host-reference grid, one thread; then the d=128 backward
      # bench with synchronous staging, for the comparison (the trace says which staging ran)
      for tool in memcheck racecheck; do
        with_cache "$TEST_CACHE" timeout ${MEMCHECK_TIMEOUT:-150} $S --tool $tool --print-limit 5 "$B/cuda_kernel" low_precision_grid_host --test-threads 1 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|^test " | head -10
      done
      BURN_ATTN_MMA_SYNC=1 BURN_ATTN_TRACE=1 timeout 150 $AF --backward --repeats 5 --skip-burn --only d=128 > "$OUT/backward-sync.log" 2>&1
      grep -v "^burn-attn:" "$OUT/backward-sync.log"; grep "^burn-attn: flash_mma_backward planes" "$OUT/backward-sync.log" | sort | uniq -c | head -4 ;;
    memory-train) timeout 120 "$B/attention_forward" --backend cuda --dtype bf16 --memory --backward 2>&1 | tee "$OUT/memory-train.log" ;;
    portable) # the portable kernels (flash_unit v2, backward v4: CUDA's default f32 path):
      # memcheck and racecheck of the f32 kernel tests, one thread; the f32 forward at n=4096
      # with tile variants (PORTABLE_VARIANTS, as TUNE_VARIANTS); the f32 backward at n=1024
      for tool in memcheck racecheck; do
        with_cache "$TEST_CACHE" timeout ${MEMCHECK_TIMEOUT:-150} $S --tool $tool --print-limit 5 "$B/cuda_kernel" f32 --test-threads 1 2>&1 | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|^test " | head -10
      done
      # (the default 32 x 32 tile won at 48 KiB last lease; the variants past 48 KiB need
      # BURN_ATTN_UNIT_SHARED_KIB: bigger register tiles, fewer cubes per SM)
      for v in ${PORTABLE_VARIANTS:-default BURN_ATTN_UNIT_SHARED_KIB=96,BURN_ATTN_UNIT_BLOCK_Q=64,BURN_ATTN_UNIT_BLOCK_K=32 BURN_ATTN_UNIT_SHARED_KIB=96,BURN_ATTN_UNIT_BLOCK_Q=64,BURN_ATTN_UNIT_BLOCK_K=64}; do
        echo "-- variant [$v]"
        vars=${v//,/ }; [ "$v" = default ] && vars=
        env $vars BURN_ATTN_TRACE=1 timeout 60 "$B/attention_forward" --backend cuda --dtype f32 --repeats 5 --skip-burn --only "n=4096 d=128" 2>&1 | grep -E "ours|tiles|error|panick" | sort | uniq -c | head -6
      done
      # the f32 kernel tests with the bigger budget (its tiles checked, not only timed)
      with_cache "$TEST_CACHE" env BURN_ATTN_UNIT_SHARED_KIB=96 timeout ${PORTABLE_TIMEOUT:-200} "$B/cuda_kernel" f32 --test-threads 2 2>&1 | grep -E "test result|panicked" | sed 's/^/[96 KiB] /' | head -4
      # the backward alone (Burn's materialised peer compiles and tunes for minutes)
      timeout ${PORTABLE_TIMEOUT:-200} "$B/attention_forward" --backend cuda --dtype f32 --backward --repeats 3 --skip-burn --only "d=128" 2>&1 | tee "$OUT/backward-f32.log" | grep -vE "^\s*$" | grep -v "^burn-attn:" | head -8 ;;
    f32) timeout ${F32_TIMEOUT:-150} "$B/attention_forward" --backend cuda --dtype f32 --repeats 5 --only "n=4096" 2>&1 | tee "$OUT/bench-f32.log" ;;
    tf32) # the f32 forward on the matrix units (opt-in): its test (launched directly, no
      # switch), its registers/spills, then the f32 bench through BURN_ATTN_TF32=1 (Burn's peers included)
      with_cache "$TEST_CACHE" timeout 150 "$B/cuda_kernel" tf32 --test-threads 2 --nocapture 2>&1 | tee "$OUT/tf32-test.log" | grep -E "^test |panicked|FAILED|test result|declined" | head -20
      echo "cases checked: $(grep -cE '^tf32 .*out err' "$OUT/tf32-test.log")"; grep -E "^tf32 .*out err" "$OUT/tf32-test.log" | tail -3
      rm -rf /tmp/cubecl-cache-ptxas-tf32  # an empty cache, so that the kernel's source is logged
      with_cache /tmp/cubecl-cache-ptxas-tf32 env BURN_ATTN_TF32=1 BURN_ATTN_TRACE=1 CUBECL_DEBUG_LOG="$OUT/cubecl-tf32.log" timeout 60 "$B/attention_forward" --backend cuda --dtype f32 --repeats 1 --skip-burn --only "n=1024 d=128 full" 2>&1 | sort | uniq -c | head
      awk '/FlashTf32Kernel/{f=1} f&&/^```cpp/{p=1;next} p&&/^```$/{exit} p' "$OUT/cubecl-tf32.log" > "$OUT/flash_tf32.cu"
      timeout 60 python3 scripts/device/ptxas_stats.py "$OUT/flash_tf32.cu" 2>&1 | grep -E "ptxas|spill|Used|error" | head
      # the configurations the default shapes do not reach: synchronous staging, 32 rows per
      # plane (TF32_VARIANTS=BURN_ATTN_TF32_ROWS=32), 16-key tiles (the test launches the kernel
      # directly; the overrides apply)
      for v in ${TF32_VARIANTS:-BURN_ATTN_MMA_SYNC=1 BURN_ATTN_TF32_BLOCK_K=16}; do
        with_cache "$TEST_CACHE" env $v timeout 80 "$B/cuda_kernel" tf32 --test-threads 2 2>&1 | grep -E "test result|panicked" | sed "s/^/[$v] /" | head -3
      done
      BURN_ATTN_TF32=1 BURN_ATTN_TRACE=1 timeout 150 "$B/attention_forward" --backend cuda --dtype f32 --repeats 5 --only "n=4096" 2>&1 | tee "$OUT/bench-tf32.log" | grep -v "^burn-attn:"
      grep "^burn-attn:" "$OUT/bench-tf32.log" | sed 's/[0-9][0-9, ]*\]/N]/' | sort | uniq -c | head ;;
    train) # the associative-recall example at a GPU size (f32, Autodiff<Cuda>): the exact
      # cores train through our forward and backward kernels (the trace counts the launches)
      CUBECL_AUTOTUNE_LEVEL=minimal BURN_ATTN_TRACE=1 timeout ${TRAIN_TIMEOUT:-300} "$B/associative_recall" --kinds ${TRAIN_KINDS:-flash,sliding-window,hybrid} --steps ${TRAIN_STEPS:-400} --max-seconds ${TRAIN_SECONDS:-120} ${TRAIN_ARGS:---d-model 256 --heads 8 --pairs 32 --batch 128} > "$OUT/train.log" 2>&1
      grep -v "^burn-attn:" "$OUT/train.log" | tail -30; grep "^burn-attn:" "$OUT/train.log" | sed 's/[0-9][0-9, ]*\]/N]/' | sort | uniq -c | head ;;
    compare) # every method in one call: Burn compiles and tunes its kernels on the first call
      # of each shape (about a minute per new shape on the H200), so one process shares that
      # cost across methods (eleven separate calls of 38 s each printed almost nothing).
      # With the caches filled (earlier calls of this binary folder) all 22 rows take about a
      # minute; from empty caches 4 rows took 356 s. Peers: this lease's torch.json (peers
      # step) or a carried .carry/torch.json; neither = no peer column.
      PEERS_ARG=; for j in "$OUT/torch.json" .carry/torch.json; do [ -f "$j" ] && { PEERS_ARG="--peers $j"; break; }; done
      CUBECL_AUTOTUNE_LEVEL=minimal timeout ${COMPARE_TIMEOUT:-560} "$B/burn-attn-bench" compare --time-limit $(( ${COMPARE_TIMEOUT:-560} - 120 )) --backend cuda --dtype bf16 --tokens 32768 --lengths ${COMPARE_LENGTHS:-1024,4096} --heads 16 --head-dim 128 --repeats 5 --no-progress $PEERS_ARG --out-dir "$OUT/compare" 2>&1 | tee "$OUT/compare.log" | tail -60 ;;
    wgpu) # the same bench on the H200 through Vulkan (needs the loader carried in .gl/)
      for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
      # Force the discrete adapter: the default pick ran 20x slower than CUDA's portable
      # kernel last time (a software adapter, most likely); no discrete GPU = a loud failure.
      export CUBECL_WGPU_DEFAULT_DEVICE='DiscreteGpu(0)'
      # Which Vulkan drivers the machine offers (the NVIDIA one needs the container's
      # "graphics" driver capability)
      ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1 | tr '\n' ' '; echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset}"
      # WGPU_BURN=1 keeps Burn's own attention in the run (its Vulkan kernels compile and tune first)
      skip=--skip-burn; [ "${WGPU_BURN:-0}" = 1 ] && skip=
      for dt in ${WGPU_DTYPES:-f32 f16}; do timeout ${WGPU_TIMEOUT:-150} "$B/attention_forward" --backend wgpu --dtype $dt --repeats 5 $skip --only "${WGPU_ONLY:-d=128}" --json "$OUT/bench-wgpu-$dt.json" 2>&1 | grep -vE "^\s*$" | tail -12; done ;;
    save-cache) # bring the caches back: copy $OUT/cubecl-cache.tar.xz into .carry/ for the next lease
      tar -cJf "$OUT/cubecl-cache.tar.xz" -C "$CACHE" . && ls -la "$OUT/cubecl-cache.tar.xz" && du -sh "$CACHE" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "== done $(date +%T)"
