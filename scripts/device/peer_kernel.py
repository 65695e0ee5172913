"""Run one peer attention case a few times, for Nsight Compute's kernel durations
(lease.sh peer-durations): the same shapes and masks as the peer script, bf16, h=16,
d=128, batch 32768/n.

    python3 peer_kernel.py flash N CAUSAL      # SDPA's flash backend (FlashAttention-2)
    python3 peer_kernel.py flex-sym N W        # FlexAttention, symmetric window of W keys
    python3 peer_kernel.py flex-causal N W     # FlexAttention, causal window of W keys
"""
import sys

import torch

kind, n, arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
b, h, d = max(1, 32768 // n), 16, 128
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
if kind == "flash":
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(8):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=arg == 1)
else:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    w = arg
    if kind == "flex-sym":  # as the peer script: |q - k| <= w / 2

        def mask_mod(bb, hh, qi, ki):
            return (qi - ki <= w // 2) & (ki - qi <= w // 2)

    else:

        def mask_mod(bb, hh, qi, ki):
            return (qi >= ki) & (qi - ki < w)

    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
    fa = torch.compile(flex_attention)
    for _ in range(8):
        fa(q, k, v, block_mask=bm)
torch.cuda.synchronize()
