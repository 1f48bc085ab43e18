"""PyTorch counterparts of benches/adapter_sum.rs (same keys): a copy of W
(`W.clone()`) and the merge W += alpha·B·A as an in-place `addmm_` (cuBLAS
with beta = 1), for W of 4096×4096 and 11008×4096 (N×K) in bf16 and f32 and
total rank 16, 64, 512. The factors are in W's dtype here (lorafuse's are
f32 and its update is accumulated in f32)."""
import torch

from common import time_us


def run(dev):
    rows = []
    for n, k in ((4096, 4096), (11008, 4096)):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            w = torch.randn(n, k, device=dev, dtype=dtype)
            tag = f"{name} {n}x{k}"
            rows.append({"key": f"adapter_sum copy {tag}", "us": time_us(lambda: w.clone())})
            for rank in (16, 64, 512):
                b = torch.randn(n, rank, device=dev, dtype=dtype)
                a = torch.randn(rank, k, device=dev, dtype=dtype)
                us = time_us(lambda: w.addmm_(b, a, alpha=1e-3))
                rows.append({"key": f"adapter_sum merge {tag} r{rank}", "us": us, "rank": rank})
    return rows
