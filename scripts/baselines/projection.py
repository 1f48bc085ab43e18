"""PyTorch counterparts of benches/projection.rs (same keys): Uni-LoRA's
gather θ_D = (θ_d[idx] · scale[idx]).to(bf16) with a stored int64 index per
row, as an index-based implementation keeps it, and the scatter
g_d = zeros(d).index_add_(0, idx, g_D.float()), for D ∈ {1M, 16M, 64M} and
d ∈ {1024, 23040}."""
import torch

from common import time_us


def run(dev):
    rows = []
    for D in (1 << 20, 16 << 20, 64 << 20):
        for d in (1024, 23040):
            idx = torch.randint(0, d, (D,), device=dev)
            theta = torch.randn(d, device=dev) * 0.02
            scale = torch.rand(d, device=dev)
            grad = torch.randn(D, device=dev, dtype=torch.bfloat16)
            tag = f"bf16 D={D >> 20}M d={d}"
            gather = time_us(lambda: (theta[idx] * scale[idx]).to(torch.bfloat16))
            scatter = time_us(lambda: torch.zeros(d, device=dev).index_add_(0, idx, grad.float()))
            rows.append({"key": f"projection gather {tag}", "us": gather, "D": D, "d": d})
            rows.append({"key": f"projection scatter {tag}", "us": scatter, "D": D, "d": d})
            del idx, grad
    return rows
