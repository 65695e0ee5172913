#!/usr/bin/env python3
"""PyTorch's attention kernels timed on the shapes of burn-attn's kernel benchmark: the
peers our timings are compared with.

What it measures (bf16 by default, h = 16, d = 128, inputs [b, h, n, d] contiguous):

  * SDPA (`torch.nn.functional.scaled_dot_product_attention`) held to one backend at a
    time by `torch.nn.attention.sdpa_kernel`: FlashAttention-2 (`sdpa-flash`), cuDNN
    (`sdpa-cudnn`) and memory-efficient (`sdpa-efficient`), full and causal, at
    n = 1024, 4096, 16384 with batch 32768 / n. A backend that refuses a case is skipped
    with a printed note.
  * FlexAttention (`torch.nn.attention.flex_attention`, compiled with `torch.compile`,
    masks from `create_block_mask`) at n = 16384, b = 2: the windows of our benchmark
    (`flex-window-sym` 1024 and 256, `flex-window-causal` 1024; the record's `window` is
    the total size w) and, for reference, Flex's own causal (`flex-causal`) and full
    (`flex-full`, no block mask) attention.

The windows are burn-attn's (`burn_attn::Window`), matched exactly:
  * symmetric window w (`Window::symmetric`): key j is visible to query i iff
    |i - j| <= w / 2 (integer division), so w + 1 keys per interior row for even w;
  * causal window w (`Window::causal`, `SlidingWindowAttention` with `causal`): key j is
    visible iff 0 <= i - j <= w - 1, so w keys per interior row.
    `burn-attn-bench kernel` runs its "causal window w" case as `Window::causal(w)` too.
    `--causal-window symmetric` uses instead the causal rule intersected with the
    symmetric window (0 <= i - j <= w / 2, w / 2 + 1 keys), the band older benchmark runs
    used. Compare a causal window only where both sides count the same keys: each record
    carries `visible_keys`.
Before timing, every case counts its mask's visible keys over all rows (from the very
function given to FlexAttention) and checks the count against the band's closed form,
prints the visible keys of an interior row, and compares a few output rows with an f32
reference computed from the band itself.

Timing: a warm-up first (compilation and autotuning, then at least 3 runs and 200 ms so
that the clocks are up), then per sample CUDA events around `--calls` calls queued back to
back; the record's `ms` is the per-call time, median over `--repeats` samples. This is a
wall clock on the GPU's stream: gaps between queued launches count, so it is what a
training step sees, not the kernel alone (see `--kernel-once`).
`--backward` times the training step instead: forward, then gradients of
`(out * w).sum()` for q, k and v (`torch.autograd.grad`), and reports the backward as
step - forward (the forward timed on the same grad-requiring inputs); kinds get a `-bwd`
suffix.
TFLOP/s use FlashAttention's count on the visible pairs: forward 4 * b * h * d * (sum over
rows of the visible keys), backward 2.5x that.

Output: OUT.json, a JSON list of records (kind, dtype, b, h, n, d, causal, window, ms, and
extra fields: pass, calls, repeats, visible_keys, visible_pairs, left, right, tflops,
device, torch; backward records also fwd_ms and step_ms), rewritten after each case.
burn-attn-bench reads it with `--peers OUT.json` (crates/burn-attn-bench/src/peers.rs;
serde ignores the extra fields).

Usage:
    python3 scripts/peers/torch_attention.py OUT.json [--dtype bf16|f16] [--calls K]
        [--repeats R] [--only SUBSTRING] [--backward] [--kernel-once]
        [--causal-window causal|symmetric]

`--only` keeps the cases whose label contains SUBSTRING; labels read
`sdpa-flash b=2 h=16 n=16384 d=128 causal` or
`flex-window-sym b=2 h=16 n=16384 d=128 window 1024` (with `-bwd` under `--backward`).

`--kernel-once` times nothing and writes no file: each case is warmed up, then run once
(under `--backward`, only the backward of a forward done beforehand) between
`cudaProfilerStart` / `cudaProfilerStop` and inside an NVTX range named by its label,
which is printed first. Nsight Compute then times the kernels alone:
    ncu --profile-from-start off -k regex:"flash_fwd|triton_tem" \\
        --metrics gpu__time_duration.sum \\
        python3 scripts/peers/torch_attention.py /tmp/unused.json --kernel-once \\
        --only "n=16384 d=128 window 1024"
(kernel names: SDPA flash `flash_fwd*` / `flash_bwd*`, FlexAttention `triton_tem_fused*`,
cuDNN `cudnn*`, memory-efficient `fmha_cutlass*`). ncu prints its metrics at the end, in
launch order; its `==PROF== Profiling` lines come between the printed labels. `--only` with
one case's label per process keeps the attribution trivial. Every launch is measured once:
no `--launch-skip` (the warm-up is outside the profiled range).
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

TOKENS = 32768  # batch = TOKENS / n for the SDPA cases
LENGTHS = (1024, 4096, 16384)
HEADS = 16
HEAD_DIM = 128
WINDOW_SEQ = 16384  # the FlexAttention cases
WINDOW_BATCH = 2
SYMMETRIC_WINDOWS = (1024, 256)
CAUSAL_WINDOWS = (1024,)
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
WARMUP_RUNS = 3
WARMUP_SECONDS = 0.2
# The checked rows pass where |out - f32 reference| <= CHECK_ATOL + CHECK_RTOL * |reference|
# everywhere: the output's own rounding to bf16 is up to 2^-9 of its size, and the first
# rows of a causal mask average only a few values of v (|out| up to ~4: 0.008-0.016 seen).
CHECK_ATOL = 1e-2
CHECK_RTOL = 1e-2
COUNT_CHUNK = 1024  # query rows per mask evaluation when counting visible pairs


class MaskMismatch(Exception):
    """The mask function and the band's closed form disagree: a bug of this script."""


class CheckFailed(Exception):
    """The kernel's output differs from the f32 reference on the checked rows."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time PyTorch's attention kernels (SDPA backends, FlexAttention windows) "
        "on burn-attn's benchmark shapes; writes the JSON that burn-attn-bench --peers reads.",
    )
    p.add_argument("out", metavar="OUT.json", help="where to write the records")
    p.add_argument("--dtype", choices=("bf16", "f16"), default="bf16")
    p.add_argument("--calls", type=int, default=10, metavar="K",
                   help="calls queued back to back per sample (default 10)")
    p.add_argument("--repeats", type=int, default=20, metavar="R",
                   help="samples per case; the median is reported (default 20)")
    p.add_argument("--only", metavar="SUBSTRING", help="keep the cases whose label contains it")
    p.add_argument("--backward", action="store_true",
                   help="time the backward (step - forward) instead of the forward")
    p.add_argument("--kernel-once", action="store_true",
                   help="run each case once after warm-up, for Nsight Compute; no timing, no file")
    p.add_argument("--causal-window", choices=("causal", "symmetric"), default="causal",
                   help="causal window w: the w most recent keys (Window::causal, default) or "
                   "the causal half of the symmetric window (w/2 + 1 keys, as the "
                   "causal window case of burn-attn-bench kernel is written now)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be at least 1")
    return args


# Masks. Each is written as FlexAttention's mask_mod (batch, head, query index, key index)
# and doubles as the counter of visible keys: called with a column of query indices and a
# row of key indices it broadcasts to the [rows, keys] mask.

def full_mask(b, h, q_idx, kv_idx):
    return (q_idx >= 0) & (kv_idx >= 0)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def symmetric_window_mask(w):
    half = w // 2

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= half) & (kv_idx - q_idx <= half)

    return mask_mod


def causal_window_mask(back):
    """Keys from `back` positions before the query up to the query itself."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= back)

    return mask_mod


class Case:
    """One timed case: kind, shape and its band (`left` keys back, `right` keys ahead;
    None = unbounded), the same band as burn_attn::Window."""

    def __init__(self, kind, b, n, causal, window, left, right, mask_fn,
                 backend=None, block_mask=True):
        self.kind = kind
        self.b = b
        self.h = HEADS
        self.n = n
        self.d = HEAD_DIM
        self.causal = causal
        self.window = window
        self.left = left
        self.right = right
        self.mask_fn = mask_fn
        self.backend = backend  # SDPA backend name; None for FlexAttention
        self.block_mask = block_mask  # FlexAttention: build a block mask (False: full, None)

    def label(self, backward):
        if self.window is not None:
            mask = f"{'causal ' if self.causal else ''}window {self.window}"
        else:
            mask = "causal" if self.causal else "full"
        kind = self.kind + ("-bwd" if backward else "")
        return f"{kind} b={self.b} h={self.h} n={self.n} d={self.d} {mask}"

    def row_range(self, i):
        """The visible keys of row i from the band's closed form: (first, last)."""
        lo = 0 if self.left is None else max(0, i - self.left)
        hi = self.n - 1 if self.right is None else min(self.n - 1, i + self.right)
        return lo, hi

    def visible_pairs(self):
        """Visible (query, key) pairs summed exactly over the rows."""
        total = 0
        for i in range(self.n):
            lo, hi = self.row_range(i)
            total += max(0, hi - lo + 1)
        return total

    def flops(self, backward):
        fwd = 4.0 * self.b * self.h * self.d * self.visible_pairs()
        return 2.5 * fwd if backward else fwd


def build_cases(causal_window_rule):
    cases = []
    for n in LENGTHS:
        b = max(1, TOKENS // n)
        for causal in (False, True):
            for backend in SDPA_BACKENDS:
                cases.append(Case(
                    f"sdpa-{backend}", b, n, causal, None,
                    None, 0 if causal else None,
                    causal_mask if causal else full_mask, backend=backend))
    n, b = WINDOW_SEQ, WINDOW_BATCH
    for w in SYMMETRIC_WINDOWS:
        cases.append(Case("flex-window-sym", b, n, False, w, w // 2, w // 2,
                          symmetric_window_mask(w)))
    for w in CAUSAL_WINDOWS:
        back = w - 1 if causal_window_rule == "causal" else w // 2
        cases.append(Case("flex-window-causal", b, n, True, w, back, 0,
                          causal_window_mask(back)))
    cases.append(Case("flex-causal", b, n, True, None, None, 0, causal_mask))
    cases.append(Case("flex-full", b, n, False, None, None, None, full_mask, block_mask=False))
    return cases


def count_mask(torch, case, device):
    """Visible pairs over all rows and the visible keys of the interior row n / 2, from
    the mask function itself; raises MaskMismatch where they differ from the band."""
    n = case.n
    zero = torch.zeros((), dtype=torch.int64, device=device)
    kv = torch.arange(n, device=device)[None, :]
    total = 0
    for start in range(0, n, COUNT_CHUNK):
        q = torch.arange(start, min(start + COUNT_CHUNK, n), device=device)[:, None]
        total += int(case.mask_fn(zero, zero, q, kv).sum().item())
    row = n // 2
    visible = case.mask_fn(zero, zero, torch.tensor([[row]], device=device), kv)[0]
    keys = visible.nonzero().flatten()
    row_keys = int(keys.numel())
    first, last = (int(keys[0]), int(keys[-1])) if row_keys else (None, None)
    expected_total = case.visible_pairs()
    lo, hi = case.row_range(row)
    expected_row = max(0, hi - lo + 1)
    contiguous = row_keys == 0 or last - first + 1 == row_keys
    if total != expected_total or row_keys != expected_row or not contiguous \
            or (row_keys and (first, last) != (lo, hi)):
        raise MaskMismatch(
            f"{case.label(False)}: mask gives {total} pairs, row {row} keys {first}..{last} "
            f"({row_keys}); the band (left {case.left}, right {case.right}) gives "
            f"{expected_total} pairs, keys {lo}..{hi} ({expected_row})")
    return total, row, row_keys, first, last


def check_rows(torch, case, q, k, v, out):
    """Max |out - reference| over a few query rows; the reference applies the band's
    closed form (not the mask function) in f32."""
    rows = sorted({0, 1, case.n // 2, case.n - 1})
    idx = torch.tensor(rows, device=q.device)
    scores = q[:, :, idx].float() @ k.float().transpose(-1, -2) / math.sqrt(case.d)
    j = torch.arange(case.n, device=q.device)[None, :]
    i = idx[:, None]
    allowed = torch.ones(len(rows), case.n, dtype=torch.bool, device=q.device)
    if case.left is not None:
        allowed &= j >= i - case.left
    if case.right is not None:
        allowed &= j <= i + case.right
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ v.float()
    diff = (out[:, :, idx].float() - ref).abs()
    err = diff.max().item()
    excess = (diff - CHECK_RTOL * ref.abs()).max().item()
    if not excess <= CHECK_ATOL:
        raise CheckFailed(f"max |out - reference| = {err:.3g} on rows {rows}, beyond "
                          f"{CHECK_ATOL} + {CHECK_RTOL} * |reference| by up to {excess:.3g}")
    return err


def warm_up(torch, fn):
    """First call (compilation, autotuning), then at least WARMUP_RUNS runs and
    WARMUP_SECONDS so that the clocks are up."""
    fn()
    torch.cuda.synchronize()
    runs, start = 1, time.perf_counter()
    while runs < WARMUP_RUNS or time.perf_counter() - start < WARMUP_SECONDS:
        fn()
        torch.cuda.synchronize()
        runs += 1


def median_ms(torch, fn, calls, repeats):
    """Per-call milliseconds, median over `repeats` samples of `calls` queued calls, each
    sample timed by CUDA events on the current stream."""
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def kernel_once(torch, label, fn):
    """One run of `fn` alone between profiler start and stop, in an NVTX range."""
    print(f"kernel-once: {label}", flush=True)
    torch.cuda.synchronize()
    profiler = True
    try:
        torch.cuda.profiler.start()
    except Exception as ex:  # no profiler API: the run still happens, only unbracketed
        print(f"kernel-once: cudaProfilerStart failed ({ex})", flush=True)
        profiler = False
    torch.cuda.nvtx.range_push(label)
    fn()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    if profiler:
        torch.cuda.profiler.stop()


def run_case(torch, env, case, args, dtype):
    """Checks, warms up and times (or runs once) one case; returns its record or None."""
    F = env["F"]
    device = "cuda"
    label = case.label(args.backward)

    pairs, row, row_keys, first, last = count_mask(torch, case, device)
    print(f"{label}: mask visible keys {row_keys} in interior row {row} (keys {first}..{last}), "
          f"{pairs} pairs in all ({pairs / case.n:.1f} per row)", flush=True)

    torch.manual_seed(0)
    shape = (case.b, case.h, case.n, case.d)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

    if case.backend is not None:
        backend = env["backends"][case.backend]
        context = env["sdpa_kernel"](backend)
        causal = case.causal

        def attn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        context = contextlib.nullcontext()
        block_mask = None
        if case.block_mask:
            block_mask = env["create_block_mask"](case.mask_fn, B=None, H=None,
                                                  Q_LEN=case.n, KV_LEN=case.n, device=device)
            try:
                print(f"{label}: block mask {block_mask.sparsity():.1f}% sparse", flush=True)
            except Exception:  # the summary is optional
                pass
        flex = env["flex"]

        def attn(q, k, v):
            return flex(q, k, v, block_mask=block_mask)

    with context:
        if args.backward:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = attn(qg, kg, vg)
            err = check_rows(torch, case, q, k, v, out.detach())
            weight = torch.randn_like(out)
            del out

            def forward():
                return attn(qg, kg, vg)

            def step():
                return torch.autograd.grad((attn(qg, kg, vg) * weight).sum(), (qg, kg, vg))

            warm_up(torch, forward)
            warm_up(torch, step)
            if args.kernel_once:
                loss = (attn(qg, kg, vg) * weight).sum()
                kernel_once(torch, label, lambda: torch.autograd.grad(loss, (qg, kg, vg)))
                return None
            fwd_ms = median_ms(torch, forward, args.calls, args.repeats)
            step_ms = median_ms(torch, step, args.calls, args.repeats)
            ms = step_ms - fwd_ms
        else:
            with torch.no_grad():
                out = attn(q, k, v)
                err = check_rows(torch, case, q, k, v, out)
                del out

                def forward():
                    return attn(q, k, v)

                warm_up(torch, forward)
                if args.kernel_once:
                    kernel_once(torch, label, forward)
                    return None
                ms = median_ms(torch, forward, args.calls, args.repeats)

    flops = case.flops(args.backward)
    # None, not NaN, where the difference is not positive: serde_json rejects NaN.
    tflops = flops / ms / 1e9 if ms > 0 else None
    rate = f"{tflops:7.1f}" if tflops is not None else "      -"
    line = f"{label:<52} {ms:9.3f} ms {rate} TFLOP/s"
    if args.backward:
        line += f" (step {step_ms:.3f} ms - forward {fwd_ms:.3f} ms)"
    print(f"{line}  [check err {err:.1e}]", flush=True)

    record = {
        "kind": case.kind + ("-bwd" if args.backward else ""),
        "dtype": args.dtype,
        "b": case.b,
        "h": case.h,
        "n": case.n,
        "d": case.d,
        "causal": case.causal,
        "window": case.window,
        "ms": ms,
        "pass": "backward" if args.backward else "forward",
        "calls": args.calls,
        "repeats": args.repeats,
        "visible_keys": row_keys,
        "visible_pairs": pairs,
        "left": case.left,
        "right": case.right,
        "tflops": tflops,
        "check_err": err,
        "device": env["device_name"],
        "torch": torch.__version__,
    }
    if args.backward:
        record["fwd_ms"] = fwd_ms
        record["step_ms"] = step_ms
    return record


def main(argv=None):
    args = parse_args(argv)

    import torch
    import torch._dynamo
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    env = {
        "F": F,
        "sdpa_kernel": sdpa_kernel,
        "backends": {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        },
        "device_name": torch.cuda.get_device_name(),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # Every mask is a new closure, and each guards a recompilation of flex_attention:
        # past Dynamo's limit it would fall back to the unfused (materialised) path.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        env["flex"] = torch.compile(flex_attention, dynamic=False)
        env["create_block_mask"] = create_block_mask
    except Exception as ex:  # no FlexAttention: the SDPA cases still run
        print(f"FlexAttention unavailable: {type(ex).__name__}: {ex}", flush=True)
        env["flex"] = None

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    mode = "kernel-once" if args.kernel_once else f"calls {args.calls}, repeats {args.repeats}"
    print(f"torch {torch.__version__}, triton {triton_version}, {env['device_name']}; "
          f"{args.dtype}, {'backward' if args.backward else 'forward'}, {mode}", flush=True)

    cases = [c for c in build_cases(args.causal_window)
             if not args.only or args.only in c.label(args.backward)]
    if not cases:
        print(f"no case label contains {args.only!r}", file=sys.stderr)
        return 2

    records, failed = [], 0
    for case in cases:
        label = case.label(args.backward)
        if case.backend is None and env["flex"] is None:
            print(f"{label}: skipped (no FlexAttention)", flush=True)
            continue
        try:
            record = run_case(torch, env, case, args, dtype)
        except MaskMismatch:
            raise
        except CheckFailed as ex:
            print(f"{label}: CHECK FAILED, not recorded: {ex}", flush=True)
            failed += 1
            continue
        except Exception as ex:  # a backend that refuses the case, or runs out of memory
            message = str(ex).strip().splitlines()
            message = message[0][:200] if message else ""
            print(f"{label}: skipped ({type(ex).__name__}: {message})", flush=True)
            torch.cuda.empty_cache()
            continue
        if record is not None:
            records.append(record)
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)

    if args.kernel_once:
        print("kernel-once: no file written", flush=True)
    else:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
