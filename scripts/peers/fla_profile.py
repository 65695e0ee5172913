#!/usr/bin/env python3
"""flash-linear-attention's kernels one call at a time, for Nsight Compute.

Runs `chunk_linear_attn` and `fused_chunk_linear_attn` (normalised, bf16, b = 2, h = 16,
d = 128, q and k uniform in [0, 1), as `torch_linear.py`) three times each to compile and
autotune, then once forward and once forward plus backward, each inside an NVTX range
named `measure`, so that

    ncu --nvtx --nvtx-include "measure/" --metrics gpu__time_duration.sum \\
        python3 scripts/peers/fla_profile.py 16384

times exactly those kernels (`run.sh linear-peer-profile` does it). Lines starting with
`===` name the call whose kernels follow.

Usage: python3 scripts/peers/fla_profile.py [N,...]   (default 16384)
"""

import sys


def main(argv):
    import torch
    from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn

    b, h, d = 2, 16, 128
    lengths = [int(x) for x in (argv[1] if len(argv) > 1 else "16384").split(",")]
    for n in lengths:
        torch.manual_seed(0)
        q = torch.rand((b, n, h, d), device="cuda", dtype=torch.bfloat16)
        k = torch.rand((b, n, h, d), device="cuda", dtype=torch.bfloat16)
        v = torch.randn((b, n, h, d), device="cuda", dtype=torch.bfloat16)
        do = torch.randn((b, n, h, d), device="cuda", dtype=torch.bfloat16)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        for op in (chunk_linear_attn, fused_chunk_linear_attn):
            def forward():
                with torch.no_grad():
                    op(q, k, v, normalize=True)

            def step():
                out, _ = op(qg, kg, vg, normalize=True)
                out.backward(do)

            for _ in range(3):
                forward()
                step()
            for what, call in (("forward", forward), ("fwdbwd", step)):
                torch.cuda.synchronize()
                print(f"=== {op.__name__} n={n} {what}", flush=True)
                torch.cuda.nvtx.range_push("measure")
                call()
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
