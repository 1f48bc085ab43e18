"""PyTorch baselines for benches/multi_adapter.rs: the LoRA term of many
adapters in one batch as a PyTorch serving loop without custom kernels runs
it, a gathered `bmm`, bf16, K = N = 4096, r = 16, with the bench's keys.

- decode: 64 rows, 64 distinct adapters: A[idx], B[idx] gathered per row,
  two bmm, added to y.
- prefill: 8,192 rows in 8 equal segments: x viewed as [8, 1024, K], the
  8 adapters' A and B gathered per segment, two bmm.
- Uni-LoRA: each adapter's A and B gathered from its θ_d (d = 23,040)
  through a column index per θ_D entry and the column scales (the
  materialisation a PyTorch implementation does before the LoRA term),
  then the same bmm. The indices are random here (the cost of the gather,
  not lorafuse's hash, is what is timed).
Like the bench, runs rotate over four adapter sets so adapters come from
memory, not L2.
"""
import torch

from common import time_us

K = N = 4096
R = 16
D_THETA = 23040
SETS = 4


def _lora_term(x3, y3, a, b, scale):
    # x3: [G, rows, K], a: [G, R, K], b: [G, N, R] -> y3 += scale * x3·aᵀ·bᵀ
    t = torch.bmm(x3, a.transpose(1, 2))
    y3.add_(torch.bmm(t, b.transpose(1, 2)), alpha=scale)


def _rows(dev, groups, rows_per_group, adapters):
    x = torch.randn(groups, rows_per_group, K, device=dev, dtype=torch.bfloat16)
    y = torch.randn(groups, rows_per_group, N, device=dev, dtype=torch.bfloat16)
    a = torch.randn(SETS * adapters, R, K, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(SETS * adapters, N, R, device=dev, dtype=torch.bfloat16) * 0.02
    idx = [torch.arange(s * adapters, (s + 1) * adapters, device=dev) for s in range(SETS)]
    return x, y, a, b, idx


def _uni(dev, adapters):
    theta = torch.randn(SETS * adapters, D_THETA, device=dev) * 0.02
    scale = torch.rand(D_THETA, device=dev) + 0.5
    a_col = torch.randint(0, D_THETA, (R * K,), device=dev)
    b_col = torch.randint(0, D_THETA, (N * R,), device=dev)
    return theta, scale, a_col, b_col


def _materialise(theta, scale, a_col, b_col, sel):
    th = theta[sel] * scale  # [G, d]
    a = th[:, a_col].view(-1, R, K).to(torch.bfloat16)
    b = th[:, b_col].view(-1, N, R).to(torch.bfloat16)
    return a, b


def run(dev):
    rows = []
    state = {"i": 0}

    def rotate():
        state["i"] += 1
        return state["i"] % SETS

    def gathered():
        sel = idx[rotate()]
        _lora_term(x, y, a[sel], b[sel], 2.0)

    # decode: 64 rows, one adapter each
    x, y, a, b, idx = _rows(dev, 64, 1, 64)
    us = time_us(gathered)
    rows.append({"key": "multi_adapter.decode_m64_a64_r16", "us": us, "what": "gathered bmm, 64 rows x 64 adapters"})
    theta, scale, a_col, b_col = _uni(dev, 64)

    def uni_decode():
        a_u, b_u = _materialise(theta, scale, a_col, b_col, idx[rotate()])
        _lora_term(x, y, a_u, b_u, 2.0)

    us = time_us(uni_decode)
    rows.append({"key": "multi_adapter.unilora_decode_m64_a64_r16", "us": us, "what": "gather A,B from theta, then bmm"})
    del x, y, a, b, theta

    # prefill: 8 segments of 1024 rows
    x, y, a, b, idx = _rows(dev, 8, 1024, 8)
    us = time_us(gathered)
    rows.append({"key": "multi_adapter.prefill_m8192_s8_r16", "us": us, "what": "segment bmm, 8 x 1024 rows"})
    theta, scale, a_col, b_col = _uni(dev, 8)

    def uni_prefill():
        a_u, b_u = _materialise(theta, scale, a_col, b_col, idx[rotate()])
        _lora_term(x, y, a_u, b_u, 2.0)

    us = time_us(uni_prefill)
    rows.append({"key": "multi_adapter.unilora_prefill_m8192_s8_r16", "us": us, "what": "gather A,B from theta, then bmm"})
    return rows
