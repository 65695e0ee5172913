#!/usr/bin/env bash
# What a contributor with a CUDA GPU runs: the kernel grid, the digest, the benchmark and
# its peers, kernel times under Nsight Compute, and compute-sanitizer over the grid.
#
#   bash scripts/device/run.sh build                 # cargo: binaries into $BIN
#   bash scripts/device/run.sh grid bench peers      # then any steps, in order
#
# BIN (default target/device-bin) holds `burn-attn-bench` and `cuda_kernel` (the CUDA
# kernel tests); `build` makes them, so a machine without Rust can run steps with a BIN
# built elsewhere. OUT (default target/device-out) receives logs and JSON.
# Steps:
#   build     cargo builds the two binaries (release, `cuda` feature) into $BIN
#   grid      the CUDA kernel tests (every kernel against the f64 reference), one process
#             per test, GRID_JOBS (6) at a time; GRID_FILTER picks tests by name
#   digest    bit-exact fingerprints of the op's results (`burn-attn-bench digest`) for
#             f16, bf16 and f32: compare two builds' files to check a refactor
#   bench     `burn-attn-bench kernel` forward and backward, bf16, 10 calls queued
#   peers     scripts/peers/torch_attention.py on the same shapes (PyTorch, FlexAttention)
#   masks     `burn-attn-bench masks` (block-sparse masks, forward and backward, bf16) and
#             FlexAttention under the same masks (scripts/peers/flex_masks.py), with the
#             ratios; MASKS_ARGS / FLEX_ARGS pass options (`--only block-random`)
#   masks-vulkan  the same masks through Vulkan (the portable kernels, f32 and f16;
#             `build` makes `burn-attn-bench-vulkan`; the Vulkan loader must be installed)
#   decode    one decoding step's attention (`burn-attn-bench decode`) beside PyTorch's SDPA
#             with `enable_gqa` and the copy bandwidth (scripts/peers/torch_decode.py)
#   linear    causal linear attention (`burn-attn-bench linear`: forward, training step,
#             crossover with our causal flash, growth, a streaming step) beside
#             flash-linear-attention and FlashAttention-2 (scripts/peers/torch_linear.py;
#             fla's wheels installed or in $WHEELS, see shared/DEVICE.md); LINEAR_ARGS
#             and LINEAR_PEER_ARGS pass options (`--lengths 4096,16384`)
#   linear-profile  Nsight Compute on the linear kernels' first launches at n = 16384
#             (registers, local-memory spills, occupancy, throughput; LINEAR_PROFILE_ARGS
#             passes bench options)
#   linear-peer-profile  Nsight Compute times of flash-linear-attention's kernels, one
#             forward and one training step at n = 16384 (scripts/peers/fla_profile.py;
#             WHEELS as for `linear`), for kernel-for-kernel ratios beside linear-profile
#   backward-profile  Nsight Compute sections (throughput, occupancy, warp stall reasons,
#             memory and shared-memory tables) of one dQ and one dK/dV launch at n = 4096
#             full and causal (BACKWARD_PROFILE_CASES, `|`-separated; BACKWARD_PROFILE_ARGS
#             passes plan options such as `--plan-dq-pass`), into $OUT/backward-profile-*.log
#   sources   the CUDA source CubeCL generates for every kernel a run compiles, into
#             $OUT/cubecl-sources.log.xz (SOURCES_ARGS: the bench command after
#             `burn-attn-bench`; default one linear step and one flash training step at
#             n = 1024); scripts/device/registers.py compiles them offline (no GPU) to
#             registers and spills
#   compare   the comparison tool's CUDA table (bf16, n = 4096 and 16384, 32768 tokens per
#             length, training steps too: `--train`); COMPARE_ARGS passes options
#   durations kernel times under Nsight Compute (locked clocks, one launch at a time) of
#             ours, for each binary folder in DURATION_BINS (default $BIN)
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over every kernel at
#             small shapes (the `cuda_sanitizer_sweep` test; SANITIZE_ARGS picks others)
# Keep CubeCL's compilation cache off (its default; no `[compilation] cache` in a
# cubecl.toml): it keys kernels by name and launch configuration, not by source, so a cache
# filled by another build serves that build's code.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath -m "${BIN:-target/device-bin}")
OUT=$(realpath -m "${OUT:-target/device-out}")
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
BENCH="$BIN/burn-attn-bench kernel --backend cuda --dtype bf16 --skip-burn"
CASES="n=1024 d=128 full|n=1024 d=128 causal|n=4096 d=128 full|n=4096 d=128 causal|n=16384 d=128 full|n=16384 d=128 causal"

for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    build)
      mkdir -p "$BIN"
      cargo build --release -p burn-attn-bench --features burn-attn/vulkan &&
        cp target/release/burn-attn-bench "$BIN/burn-attn-bench-vulkan" &&
        cargo build --release -p burn-attn-bench --features cuda &&
        cp target/release/burn-attn-bench "$BIN/" &&
        exe=$(cargo test --release --features burn-attn/cuda --test cuda_kernel --no-run --message-format=json 2>/dev/null |
          python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable")][-1])') &&
        cp "$exe" "$BIN/cuda_kernel" && ls -la "$BIN" ;;
    grid)
      # One process per test, GRID_JOBS at a time: each process compiles its kernels one
      # after another, so processes side by side use the host's cores (GRID_FILTER: a regex
      # of test names).
      "$BIN/cuda_kernel" --list 2>/dev/null | sed -n 's/: test$//p' |
        grep -E "${GRID_FILTER:-.}" > "$OUT/grid-tests.txt"
      # Per-test logs in one folder (a device run returns few files); the combined log and
      # each failed test's last lines beside it.
      logs="$OUT/grid-logs"
      rm -rf "$logs" && mkdir -p "$logs"
      # Burn's matmuls in the references and tiled paths autotune each new shape; at the
      # default level the bf16 fused-matmul candidates alone take minutes of NVRTC per
      # process (H100). The tests check values, not speed: the least tuning.
      CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}" \
      timeout "${GRID_TIMEOUT:-560}" xargs -P "${GRID_JOBS:-6}" -I{} sh -c \
        '"$0" --exact "$1" --nocapture > "$2/$(echo "$1" | tr : _).log" 2>&1' \
        "$BIN/cuda_kernel" {} "$logs" < "$OUT/grid-tests.txt"
      cat "$logs"/*.log > "$OUT/grid.log"
      # Failed, timed out or crashed: every log without a passing result line.
      for f in $(grep -L "test result: ok" "$logs"/*.log); do
        echo "== $(basename "$f" .log)"; tail -25 "$f"
      done > "$OUT/grid-failed.log"
      tar -cJf "$OUT/grid-logs.tar.xz" -C "$OUT" grid-logs && rm -rf "$logs"
      grep -hE "^test .* (ok|FAILED|ignored)$|panicked" "$OUT/grid.log" | head -80
      echo "tests: $(wc -l < "$OUT/grid-tests.txt"), ok: $(grep -cE '^test .* ok$' "$OUT/grid.log"), failed: $(grep -cE '^test .* FAILED$' "$OUT/grid.log"), cases checked: $(grep -cE 'out err' "$OUT/grid.log")" ;;
    digest)
      for dtype in bf16 f16 f32; do
        "$BIN/burn-attn-bench" digest --backend cuda --dtype $dtype --out "$OUT/digest-$dtype.txt" || echo "digest $dtype failed"
      done
      wc -l "$OUT"/digest-*.txt ;;
    bench)
      timeout 300 $BENCH --calls 10 --json "$OUT/bench-forward.json" 2>&1 | tee "$OUT/bench-forward.log"
      timeout 300 $BENCH --calls 10 --backward --json "$OUT/bench-backward.json" 2>&1 | tee "$OUT/bench-backward.log" ;;
    peers)
      timeout 500 python3 scripts/peers/torch_attention.py "$OUT/peers.json" 2>&1 | tee "$OUT/peers.log"
      [ -f "$OUT/peers.json" ] && timeout 300 $BENCH --calls 10 --peers "$OUT/peers.json" 2>&1 | grep "ours / peer" ;;
    masks)
      timeout 500 python3 scripts/peers/flex_masks.py "$OUT/flex.json" --backward ${FLEX_ARGS:-} 2>&1 | tee "$OUT/flex.log"
      timeout 500 "$BIN/burn-attn-bench" masks --backend cuda --dtype bf16 --backward \
        --json "$OUT/masks.json" --peers "$OUT/flex.json" ${MASKS_ARGS:-} 2>&1 | tee "$OUT/masks.log" ;;
    masks-vulkan)
      for dtype in f32 f16; do
        CUBECL_WGPU_DEFAULT_DEVICE=DiscreteGpu\(0\) timeout 500 "$BIN/burn-attn-bench-vulkan" masks \
          --backend wgpu --dtype $dtype --backward --json "$OUT/masks-vulkan-$dtype.json" \
          ${MASKS_ARGS:-} 2>&1 | tee "$OUT/masks-vulkan-$dtype.log"
      done ;;
    decode)
      timeout 300 python3 scripts/peers/torch_decode.py "$OUT/decode-peers.json" ${DECODE_PEER_ARGS:-} 2>&1 | tee "$OUT/decode-peers.log"
      timeout 200 "$BIN/burn-attn-bench" decode --backend cuda --dtype bf16 \
        --peers "$OUT/decode-peers.json" --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" ;;
    linear)
      if [ -n "${WHEELS:-}" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla-site "$WHEELS"/*.whl &&
          export PYTHONPATH=/tmp/fla-site${PYTHONPATH:+:$PYTHONPATH}
      fi
      timeout 400 python3 scripts/peers/torch_linear.py "$OUT/linear-peers.json" ${LINEAR_PEER_ARGS:-} 2>&1 |
        grep -v Warning | tee "$OUT/linear-peers.log"
      timeout 300 "$BIN/burn-attn-bench" linear --backend cuda --dtype bf16 \
        --peers "$OUT/linear-peers.json" --json "$OUT/linear.json" ${LINEAR_ARGS:-} 2>&1 | tee "$OUT/linear.log" ;;
    linear-profile)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; continue; fi
      timeout 300 "$NCU" -k regex:linear_chunk --launch-count 4 --section LaunchStats \
        --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis \
        "$BIN/burn-attn-bench" linear --backend cuda --dtype bf16 --lengths 16384 --repeats 1 \
        --calls 1 --flash-up-to 1 ${LINEAR_PROFILE_ARGS:-} > "$OUT/linear-profile.log" 2>&1
      grep -E "linear_chunk|Duration|Registers Per|Spilling Requests  |Achieved Occupancy" \
        "$OUT/linear-profile.log" ;;
    backward-profile)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; continue; fi
      IFS='|' read -ra cases <<< "${BACKWARD_PROFILE_CASES:-n=4096 d=128 full|n=4096 d=128 causal}"
      for case in "${cases[@]}"; do
        log="$OUT/backward-profile-$(echo "$case" | tr -c 'a-z0-9' '-').log"
        timeout 300 "$NCU" -k regex:flash_mma_backward --launch-skip 4 --launch-count 2 \
          --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis \
          --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis \
          $BENCH --backward --repeats 3 --calls 1 --only "$case" ${BACKWARD_PROFILE_ARGS:-} > "$log" 2>&1
        echo "-- $case"
        grep -E "flash_mma_backward|Duration|Registers Per|Achieved Occupancy|Stall|Warp Cycles Per Issued|Issued Ipc|Bank Conflicts|Compute \(SM\) Throughput|Memory Throughput" "$log" | head -60
      done ;;
    linear-peer-profile)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; continue; fi
      if [ -n "${WHEELS:-}" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla-site "$WHEELS"/*.whl &&
          export PYTHONPATH=/tmp/fla-site${PYTHONPATH:+:$PYTHONPATH}
      fi
      timeout 300 "$NCU" --nvtx --nvtx-include "measure/" --metrics gpu__time_duration.sum \
        python3 scripts/peers/fla_profile.py ${FLA_PROFILE_LENGTHS:-16384} > "$OUT/linear-peer-profile.log" 2>&1
      grep -E "^===|^  [a-zA-Z_]|gpu__time_duration" "$OUT/linear-peer-profile.log" ;;
    sources)
      rm -f "$OUT/cubecl-sources.log"
      CUBECL_DEBUG_LOG="$OUT/cubecl-sources.log" timeout 300 "$BIN/burn-attn-bench" \
        ${SOURCES_ARGS:-linear --backend cuda --dtype bf16 --lengths 1024 --repeats 1 --calls 1} \
        > /dev/null 2>&1
      xz -T4 -6 -f "$OUT/cubecl-sources.log" && ls -la "$OUT/cubecl-sources.log.xz" ;;
    compare)
      timeout 560 "$BIN/burn-attn-bench" compare --backend cuda --dtype bf16 --tokens 32768 \
        --lengths 4096,16384 --heads 16 --head-dim 128 --train --no-structured --repeats 5 \
        --warmup 2 --time-limit 480 --no-plots --no-progress --out-dir "$OUT/compare" \
        ${COMPARE_ARGS:-} 2>&1 | tee "$OUT/compare.log" | grep -v "^wrote" | tail -40 ;;
    durations)
      if [ -z "$NCU" ]; then echo "no ncu on this machine"; continue; fi
      IFS='|' read -ra cases <<< "${DURATION_CASES:-$CASES}"
      for case in "${cases[@]}"; do
        for bin in ${DURATION_BINS:-$BIN}; do
          d=$(timeout 90 "$NCU" -k regex:"${DURATION_KERNEL:-flash_mma_kernel}" --launch-skip 2 --launch-count 6 \
            --metrics gpu__time_duration.sum "$bin/burn-attn-bench" kernel --backend cuda --dtype bf16 --skip-burn \
            --repeats 4 ${DURATION_ARGS:-} --only "$case" 2>&1 | awk '/gpu__time_duration/ {print $(NF-1), $NF}' | tr '\n' ' ')
          echo "$case [$bin]: $d"
        done
      done ;;
    sanitize)
      if [ -z "$SAN" ]; then echo "no compute-sanitizer on this machine"; continue; fi
      for tool in memcheck racecheck synccheck; do
        timeout "${SANITIZE_TIMEOUT:-300}" "$SAN" --tool $tool --print-limit 5 "$BIN/cuda_kernel" --test-threads 1 ${SANITIZE_ARGS:-sanitizer_sweep} \
          > "$OUT/sanitize-$tool.log" 2>&1
        echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test result' "$OUT/sanitize-$tool.log" | tr '\n' ' ')"
        # The first report's lines (what, where, which kernel), when there is one.
        grep -m1 -A8 -E '^========= (Invalid|Barrier error|Error|Warning|WARN)' "$OUT/sanitize-$tool.log" || true
      done ;;
    *) echo "unknown step $step (build grid digest bench peers masks masks-vulkan decode linear linear-profile linear-peer-profile backward-profile sources compare durations sanitize)"; exit 2 ;;
  esac
done
