"""PyTorch SDPA (causal, bf16) at the shapes of benches/attention.rs: one
layer's forward, and forward + backward, with q, k, v as (batch, heads, seq,
head_dim) tensors. torch picks its fastest backend (FlashAttention-2 on
sm_80/sm_90 for these shapes), which is what a user's stack would run.

FLOPs use the causal convention of benches/attention.rs: forward
4·b·h·s²·d / 2 (QKᵀ and PV over half the score matrix), forward + backward
3.5× that."""
import torch
import torch.nn.functional as F

from common import time_us

# (batch, heads, seq, head_dim): GPT-2 small's attention, and a Llama-style
# head dim of 128 at a longer sequence.
SHAPES = [(8, 12, 1024, 64), (4, 32, 2048, 128)]


def key(kind, b, h, s, d):
    """The row name benches/attention.rs looks up (same string on both sides)."""
    return f"attention_{kind}_b{b}_h{h}_s{s}_d{d}_causal_bf16"


def run(dev):
    rows = []
    for b, h, s, d in SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)

        # With grad enabled, like ours: the forward also keeps the log-sum-exp.
        def fwd():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        flops = 4 * b * h * s * s * d / 2
        for kind, fn, fl in [("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3.5 * flops)]:
            us = time_us(fn)
            rows.append(dict(key=key(kind, b, h, s, d), us=us, tflops=fl / us / 1e6, b=b, h=h, s=s, d=d))
        del q, k, v, grad
    return rows
