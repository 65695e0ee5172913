#!/usr/bin/env python3
"""PyTorch's decode paths timed on the shapes of `burn-attn-bench decode`: one decoding
step's attention, new queries against a key/value cache with grouped heads.

What it measures (bf16 by default; batch 8, 32 query heads over 8 key/value heads,
d = 128; q [b, h, new, d], cache k, v [b, kv_heads, n, d], contiguous):

  * `decode-sdpa`: `scaled_dot_product_attention(q, k, v, enable_gqa=True)`, PyTorch's
    default dispatch (it picks its fastest backend for the shape);
  * `decode-flex`: FlexAttention (`flex_attention(q, k, v, enable_gqa=True)`, compiled
    with `torch.compile`, no block mask), unless `--no-flex`;
  * `copy`: the device's copy bandwidth, a copy of the largest cache's k (the record's
    `bytes` counts what it reads and writes), so that the bench can say how long reading a
    cache once takes.

Every new query sees the whole cache (no mask): one new token is a decoding step; 16 new
tokens are timed without the causal rule on both sides (`burn-attn-bench decode` runs them
so too), so both count the same keys.

Timing: `torch_attention.py`'s warm-up and CUDA-event medians (`--calls` calls queued back
to back per sample, median over `--repeats` samples); the record's `ms` is per call.

Output: OUT.json, a list of records (kind, dtype, b, h, kv_heads, n = cache length, new,
d, ms, device, torch), rewritten after each case; `burn-attn-bench decode --peers OUT.json`
reads it.

Usage:
    python3 scripts/peers/torch_decode.py OUT.json [--dtype bf16|f16] [--calls K]
        [--repeats R] [--cases NEW:CACHE,...] [--no-flex]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_attention import median_ms, warm_up  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--dtype", choices=("bf16", "f16"), default="bf16")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cases", default="1:4096,1:32768,1:131072,16:32768",
                   help="NEW:CACHE pairs, comma-separated")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = "cuda"
    name = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {name}; {args.dtype}", flush=True)
    b, h, kvh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    records = []

    def record(kind, ms, **extra):
        records.append({"kind": kind, "dtype": args.dtype, "b": b, "h": h, "kv_heads": kvh,
                        "d": d, "ms": ms, "calls": args.calls, "repeats": args.repeats,
                        "device": name, "torch": torch.__version__, **extra})
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)

    torch.manual_seed(0)
    for new, n in cases:
        q = torch.randn((b, h, new, d), device=device, dtype=dtype)
        k = torch.randn((b, kvh, n, d), device=device, dtype=dtype)
        v = torch.randn((b, kvh, n, d), device=device, dtype=dtype)
        cache_bytes = 2 * k.numel() * k.element_size()
        peers = [("decode-sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))]
        if flex is not None:
            peers.append(("decode-flex", lambda: flex(q, k, v, enable_gqa=True)))
        with torch.no_grad():
            for kind, fn in peers:
                try:
                    warm_up(torch, fn)
                    ms = median_ms(torch, fn, args.calls, args.repeats)
                except Exception as e:  # a path that refuses the shape is skipped, said
                    print(f"{kind} new={new} cache={n}: skipped ({type(e).__name__}: {e})",
                          flush=True)
                    continue
                print(f"{kind:<12} b={b} h={h}/{kvh} d={d} new={new:<3} cache={n:<7} "
                      f"{ms:8.4f} ms, cache read {cache_bytes / (ms * 1e-3) / 1e12:6.2f} TB/s",
                      flush=True)
                record(kind, ms, n=n, new=new)
    # Copy bandwidth: one copy of the largest cache's k, read and written.
    n = max(c[1] for c in cases)
    k = torch.randn((b, kvh, n, d), device=device, dtype=dtype)
    out = torch.empty_like(k)
    warm_up(torch, lambda: out.copy_(k))
    ms = median_ms(torch, lambda: out.copy_(k), args.calls, args.repeats)
    moved = 2 * k.numel() * k.element_size()
    print(f"copy of {k.numel() * k.element_size() / 2**20:.0f} MiB: {ms:.4f} ms, "
          f"{moved / (ms * 1e-3) / 1e12:.2f} TB/s read + write", flush=True)
    record("copy", ms, n=n, new=0, bytes=moved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
