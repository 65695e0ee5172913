#!/usr/bin/env python3
"""FlexAttention under the masks of `burn-attn-bench masks`: the peer of our block-sparse
kernels, timed on the same shapes (b = 2, h = 16, n = 16384, d = 128, bf16 by default).

Each mask is FlexAttention's `mask_mod`, element for element the one the Rust side
builds (crates/burn-attn-bench/src/masks.rs), and given to `create_block_mask`:
  * full: no block mask;
  * causal-window-1024: 0 <= i - j <= 1023;
  * window-sym-512: |i - j| <= 512;
  * strided-64-local-128: |i - j| <= 64, or j % 64 == 0;
  * block-random-D (D = 0.05, 0.1, 0.25, 0.5): 128 x 128 blocks, block (r, c) active when
    splitmix64(0x5eed ^ (r * blocks + c)) >> 11 is below D * 2^53 (the Rust side's hash);
  * key-padding-30: j < n - 3n/10 (the last 30% of every row's keys are padding);
  * strided-64-local-128-padding-30: the strided case with key-padding-30's padding;
  * documents-8: doc[i] == doc[j], 8 documents of hashed lengths summing to n (weights
    1 + splitmix64(0x5eed + 1 + k) % 1000, document k ending at n * (w_0 + .. + w_k) / total).
Every case counts its visible (query, key) pairs from the mask function and records them:
a ratio only compares cases whose counts agree.

Timing as `torch_attention.py` (its helpers are imported): warm-up, then CUDA events around
`--calls` queued calls, median over `--repeats` samples; `--backward` also times the
training step (gradients of `(out * w).sum()`) and records the backward as step - forward
under the kind's `-bwd` name. Writes OUT.json, a list of records (kind `flex-<mask>`,
dtype, b, h, n, d, ms, visible_pairs, ...) that `burn-attn-bench masks --peers` reads.

Usage: python3 scripts/peers/flex_masks.py OUT.json [--dtype bf16|f16] [--calls K]
           [--repeats R] [--only SUBSTRING] [--backward]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_attention import median_ms, warm_up  # noqa: E402

B, H, N, D = 2, 16, 16384, 128
LAYOUT_BLOCK = 128
LAYOUT_SEED = 0x5EED
DENSITIES = (0.05, 0.1, 0.25, 0.5)
MASK64 = (1 << 64) - 1
COUNT_CHUNK = 1024


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def random_layout(torch, n, density, device):
    blocks = (n + LAYOUT_BLOCK - 1) // LAYOUT_BLOCK
    active = [(splitmix64(LAYOUT_SEED ^ at) >> 11) / float(1 << 53) < density
              for at in range(blocks * blocks)]
    return torch.tensor(active, device=device).reshape(blocks, blocks)


def document_ids(n, documents):
    weights = [1 + splitmix64(LAYOUT_SEED + 1 + k) % 1000 for k in range(documents)]
    total, ends, acc = sum(weights), [], 0
    for w in weights:
        acc += w
        ends.append(n * acc // total)
    ids, doc = [], 0
    for p in range(n):
        while doc < documents - 1 and p >= ends[doc]:
            doc += 1
        ids.append(doc)
    return ids


def masks(torch, n, device):
    """(name, mask_mod or None for no block mask)."""
    valid = n - 3 * n // 10
    cases = [
        ("full", None),
        ("causal-window-1024", lambda b, h, i, j: (i >= j) & (i - j <= 1023)),
        ("window-sym-512", lambda b, h, i, j: (i - j <= 512) & (j - i <= 512)),
        ("strided-64-local-128",
         lambda b, h, i, j: ((i - j <= 64) & (j - i <= 64)) | (j % 64 == 0)),
    ]
    for density in DENSITIES:
        layout = random_layout(torch, n, density, device)

        def mask_mod(b, h, i, j, layout=layout):
            return layout[i // LAYOUT_BLOCK, j // LAYOUT_BLOCK]
        cases.append((f"block-random-{density}", mask_mod))
    cases.append(("key-padding-30", lambda b, h, i, j: j < valid))
    cases.append(("strided-64-local-128-padding-30",
                  lambda b, h, i, j: (((i - j <= 64) & (j - i <= 64)) | (j % 64 == 0))
                  & (j < valid)))
    docs = torch.tensor(document_ids(n, 8), device=device)
    cases.append(("documents-8", lambda b, h, i, j: docs[i] == docs[j]))
    return cases


def count_pairs(torch, mask_mod, n, device):
    if mask_mod is None:
        return n * n
    zero = torch.zeros((), dtype=torch.int64, device=device)
    kv = torch.arange(n, device=device)[None, :]
    total = 0
    for start in range(0, n, COUNT_CHUNK):
        q = torch.arange(start, min(start + COUNT_CHUNK, n), device=device)[:, None]
        # A mask_mod that ignores the query (key padding) returns one row: count it for
        # every query of the chunk.
        rows = mask_mod(zero, zero, q, kv).expand(q.shape[0], n)
        total += int(rows.sum().item())
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description="FlexAttention under burn-attn-bench's masks")
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--dtype", choices=("bf16", "f16"), default="bf16")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only")
    p.add_argument("--backward", action="store_true")
    args = p.parse_args(argv)

    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    flex = torch.compile(flex_attention, dynamic=False)
    device = "cuda"
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {args.dtype}", flush=True)
    records = []
    for name, mask_mod in masks(torch, N, device):
        if args.only and args.only not in name and name != "full":
            continue
        pairs = count_pairs(torch, mask_mod, N, device)
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N,
                                           device=device)
        torch.manual_seed(0)
        q, k, v = (torch.randn((B, H, N, D), device=device, dtype=dtype) for _ in range(3))

        def attn(q, k, v):
            return flex(q, k, v, block_mask=block_mask)

        with torch.no_grad():
            warm_up(torch, lambda: attn(q, k, v))
            fwd_ms = median_ms(torch, lambda: attn(q, k, v), args.calls, args.repeats)
        results = [("", fwd_ms)]
        if args.backward:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            weight = torch.randn_like(q)

            def step():
                return torch.autograd.grad((attn(qg, kg, vg) * weight).sum(), (qg, kg, vg))

            def forward():
                return attn(qg, kg, vg)

            warm_up(torch, forward)
            warm_up(torch, step)
            grad_fwd = median_ms(torch, forward, args.calls, args.repeats)
            step_ms = median_ms(torch, step, args.calls, args.repeats)
            results.append(("-bwd", step_ms - grad_fwd))
        tflops = 4.0 * B * H * D * pairs / fwd_ms / 1e9
        line = f"flex-{name:<22} visible {100.0 * pairs / (N * N):6.2f}% forward {fwd_ms:8.3f} ms {tflops:6.1f} TFLOP/s"
        if args.backward:
            line += f" | backward {results[1][1]:8.3f} ms"
        print(line, flush=True)
        for suffix, ms in results:
            records.append({
                "kind": f"flex-{name}{suffix}", "dtype": args.dtype, "b": B, "h": H, "n": N,
                "d": D, "ms": ms, "visible_pairs": pairs,
                "pass": "backward" if suffix else "forward", "calls": args.calls,
                "repeats": args.repeats, "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
            })
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
