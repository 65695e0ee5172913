#!/usr/bin/env python3
"""Causal linear attention's peers timed on the shapes of `burn-attn-bench linear`:
flash-linear-attention's chunked Triton kernels and FlashAttention-2's causal softmax.

What it measures (bf16 by default; batch 2, 16 heads, d = 128, causal; lengths
1024 .. 65536):

  * `fla-chunk`: `fla.ops.linear_attn.chunk_linear_attn(q, k, v, normalize=True)`;
  * `fla-fused-chunk`: `fla.ops.linear_attn.fused_chunk_linear_attn(..., normalize=True)`;
  * `fa2-causal`: `scaled_dot_product_attention(q, k, v, is_causal=True)` on the flash
    backend (FlashAttention-2).

Each is timed forward (`*`, under `no_grad`) and forward plus backward (`*-fwdbwd`: the
forward, then `out.backward(dO)`). q and k are positive (the feature map applied outside
both sides, as `burn-attn-bench linear` does: uniform in [0, 1)), v normal; fla takes
`[b, n, h, d]`, SDPA `[b, h, n, d]`.

fla is an optional import (carry its wheels, shared/DEVICE.md): without it only FA2 is
timed. Triton compiles and autotunes on the first call of each shape; that happens in the
warm-up, and the first call's time is printed too.

Timing: `torch_attention.py`'s warm-up and CUDA-event medians (`--calls` calls queued back
to back per sample, median over `--repeats` samples); the record's `ms` is per call.

Output: OUT.json, a list of records (kind, dtype, b, h, n, d, causal, ms, first_ms,
device, torch, fla), rewritten after each case; `burn-attn-bench linear --peers OUT.json`
reads it.

Usage:
    python3 scripts/peers/torch_linear.py OUT.json [--dtype bf16|f16] [--lengths N,..]
        [--calls K] [--repeats R] [--no-fa2] [--fla chunk,fused-chunk]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_attention import median_ms, warm_up  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--dtype", choices=("bf16", "f16"), default="bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,65536")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-fa2", action="store_true", help="skip FlashAttention-2")
    p.add_argument("--fla", default="chunk,fused-chunk",
                   help="fla kernels to time, comma-separated (chunk, fused-chunk)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        import fla
        from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn
        fla_version = getattr(fla, "__version__", "?")
    except Exception as e:  # fla absent: FA2 alone
        print(f"fla not importable ({type(e).__name__}: {e}): FA2 only", flush=True)
        chunk_linear_attn = fused_chunk_linear_attn = None
        fla_version = None

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = "cuda"
    name = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, fla {fla_version}, {name}; {args.dtype}", flush=True)
    b, h, d = args.batch, args.heads, args.head_dim
    records = []

    def record(kind, n, ms, first_ms):
        records.append({"kind": kind, "dtype": args.dtype, "b": b, "h": h, "n": n, "d": d,
                        "causal": True, "ms": ms, "first_ms": first_ms, "calls": args.calls,
                        "repeats": args.repeats, "device": name, "torch": torch.__version__,
                        "fla": fla_version})
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)

    def timed(kind, n, fn):
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            first_ms = (time.perf_counter() - start) * 1e3
            warm_up(torch, fn)
            ms = median_ms(torch, fn, args.calls, args.repeats)
        except Exception as e:  # a path that refuses the shape is skipped, said
            print(f"{kind} n={n}: skipped ({type(e).__name__}: {e})", flush=True)
            return
        print(f"{kind:<22} b={b} h={h} d={d} n={n:<6} {ms:9.3f} ms (first call "
              f"{first_ms:.0f} ms)", flush=True)
        record(kind, n, ms, first_ms)

    torch.manual_seed(0)
    for n in [int(x) for x in args.lengths.split(",")]:
        # fla's layout [b, n, h, d].
        q = torch.rand((b, n, h, d), device=device, dtype=dtype)
        k = torch.rand((b, n, h, d), device=device, dtype=dtype)
        v = torch.randn((b, n, h, d), device=device, dtype=dtype)
        do = torch.randn((b, n, h, d), device=device, dtype=dtype)
        peers = []
        if chunk_linear_attn is not None:
            kernels = {"chunk": chunk_linear_attn, "fused-chunk": fused_chunk_linear_attn}
            peers += [("fla-" + k, kernels[k]) for k in args.fla.split(",")]
        for kind, op in peers:
            with torch.no_grad():
                timed(kind, n, lambda: op(q, k, v, normalize=True))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def step(op=op):
                out, _ = op(qg, kg, vg, normalize=True)
                out.backward(do)
            timed(kind + "-fwdbwd", n, step)
        if not args.no_fa2:
            qs, ks, vs, dos = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                with torch.no_grad():
                    timed("fa2-causal", n, lambda: F.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=True))
                qg, kg, vg = (t.clone().requires_grad_() for t in (qs, ks, vs))

                def fa2_step():
                    F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(dos)
                timed("fa2-causal-fwdbwd", n, fa2_step)
        del q, k, v, do
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
