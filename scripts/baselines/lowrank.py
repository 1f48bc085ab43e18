"""PyTorch counterparts of benches/lowrank.rs: a PEFT-style LoRA linear
(`y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, W frozen, everything bf16 as under a bf16 model)
forward and forward + backward (dx, dA, dB) at every shape the bench times,
the decode shapes, and a VeRA linear (`y = x·Wᵀ + s·v ⊙ ((u ⊙ (x·Aᵀ))·Bᵀ)`,
A and B frozen, u and v train) at GPT-2's c_attn shape with r = 256.

Keys (the bench prints `vs_torch(key, ms)` next to the same row):
    "lowrank fwd M=.. K=.. N=.. r=.."      forward
    "lowrank fwdbwd M=.. K=.. N=.. r=.."   forward + backward
    "lowrank base M=.. K=.. N=.."          x·Wᵀ alone (the floor both share)
    "vera fwd|fwdbwd M=.. K=.. N=.. r=.."   the VeRA linear
    "lowrank decode fwd M=.. K=.. N=.. r=.." decode forward, per call, timed
                                           in batches of DECODE_BATCH calls
    "lowrank decode base M=.. K=.. N=.."    x·Wᵀ alone, the same way
"""
import torch

from common import time_us

BF = torch.bfloat16

# (M, K, N, r): GPT-2 small's linear layers at batch 8 × 1024 (c_attn, c_fc,
# attn c_proj), the 4096-wide layers, and decode. Keep in step with
# `lowrank_shapes()` in benches/lowrank.rs.
SHAPES = [
    (8192, 768, 768, 4),
    (8192, 768, 2304, 4),
    (8192, 768, 3072, 4),
    (8192, 4096, 4096, 16),
    (8192, 4096, 4096, 64),
    (512, 4096, 4096, 16),
    (8192, 4096, 11008, 16),
    (1, 4096, 4096, 4),
    (1, 4096, 4096, 16),
    (1, 4096, 4096, 64),
    (16, 4096, 4096, 4),
    (16, 4096, 4096, 16),
    (16, 4096, 4096, 64),
]
VERA_SHAPES = [(8192, 768, 2304, 256)]
# Decode rows: one call is ~10 µs, the size of a launch's overhead, so each
# sample times DECODE_BATCH calls queued back to back and divides. Keep in
# step with DECODE_BATCH and decode_rows() in benches/lowrank.rs.
DECODE_BATCH = 20
DECODE_SHAPES = [(m, 4096, 4096, r) for m in (1, 16) for r in (4, 16, 64)]


def shape_key(m, k, n, r=None):
    return f"M={m} K={k} N={n}" + ("" if r is None else f" r={r}")


def lora_rows(dev, m, k, n, r):
    x = torch.randn(m, k, device=dev, dtype=BF)
    w = torch.randn(n, k, device=dev, dtype=BF) * 0.02
    a = (torch.randn(r, k, device=dev, dtype=BF) * 0.02).requires_grad_(True)
    b = (torch.randn(n, r, device=dev, dtype=BF) * 0.02).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=BF)
    s = 2.0

    def fwd():
        with torch.no_grad():
            return x @ w.t() + ((x @ a.t()) @ b.t()) * s

    def fwdbwd():
        y = xg @ w.t() + ((xg @ a.t()) @ b.t()) * s
        y.backward(dy)

    def base():
        with torch.no_grad():
            return x @ w.t()

    key = shape_key(m, k, n, r)
    return [
        {"key": f"lowrank fwd {key}", "us": time_us(fwd), "m": m, "k": k, "n": n, "r": r},
        {"key": f"lowrank fwdbwd {key}", "us": time_us(fwdbwd), "m": m, "k": k, "n": n, "r": r},
        {"key": f"lowrank base {shape_key(m, k, n)}", "us": time_us(base), "m": m, "k": k, "n": n},
    ]


def vera_rows(dev, m, k, n, r):
    x = torch.randn(m, k, device=dev, dtype=BF)
    w = torch.randn(n, k, device=dev, dtype=BF) * 0.02
    a = torch.randn(r, k, device=dev, dtype=BF) * 0.02
    b = torch.randn(n, r, device=dev, dtype=BF) * 0.02
    u = torch.full((r,), 0.1, device=dev, dtype=BF, requires_grad=True)
    v = (torch.randn(n, device=dev, dtype=BF) * 0.1).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=BF)
    s = 1.0

    def fwd():
        with torch.no_grad():
            return x @ w.t() + v * (((x @ a.t()) * u) @ b.t()) * s

    def fwdbwd():
        y = xg @ w.t() + v * (((xg @ a.t()) * u) @ b.t()) * s
        y.backward(dy)

    key = shape_key(m, k, n, r)
    return [
        {"key": f"vera fwd {key}", "us": time_us(fwd), "m": m, "k": k, "n": n, "r": r},
        {"key": f"vera fwdbwd {key}", "us": time_us(fwdbwd), "m": m, "k": k, "n": n, "r": r},
    ]


def decode_rows(dev, m, k, n, r):
    x = torch.randn(m, k, device=dev, dtype=BF)
    w = torch.randn(n, k, device=dev, dtype=BF) * 0.02
    a = torch.randn(r, k, device=dev, dtype=BF) * 0.02
    b = torch.randn(n, r, device=dev, dtype=BF) * 0.02
    s = 2.0

    def batched(fn):
        def run():
            for _ in range(DECODE_BATCH):
                fn()

        return time_us(run) / DECODE_BATCH

    @torch.no_grad()
    def fwd():
        return x @ w.t() + ((x @ a.t()) @ b.t()) * s

    @torch.no_grad()
    def base():
        return x @ w.t()

    return [
        {"key": f"lowrank decode fwd {shape_key(m, k, n, r)}", "us": batched(fwd), "m": m, "k": k, "n": n, "r": r},
        {"key": f"lowrank decode base {shape_key(m, k, n)}", "us": batched(base), "m": m, "k": k, "n": n},
    ]


def run(dev):
    rows = []
    for shape in SHAPES:
        rows += lora_rows(dev, *shape)
        torch.cuda.empty_cache()
    for shape in VERA_SHAPES:
        rows += vera_rows(dev, *shape)
    for shape in DECODE_SHAPES:
        rows += decode_rows(dev, *shape)
    return rows
