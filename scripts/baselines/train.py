"""PyTorch (eager) timings of the trainer's memory-bound ops and LM head at
GPT-2 small's shape in bf16, keyed as benches/train.rs's `op_floors` rows:
8192 tokens (batch 8 x seq 1024), width 768, vocab 50257 (and padded 50304).
Mixed precision as the trainer runs it: the residual stream is f32, the
GEMM inputs and outputs bf16."""
import torch
import torch.nn.functional as F

from common import time_us

TOKENS, D, VOCAB, PADDED = 8192, 768, 50257, 50304


def run(dev):
    bf = torch.bfloat16
    rows = []

    def add(key, fn, **extra):
        rows.append({"key": key, "us": time_us(fn), "tokens": TOKENS, "width": D, **extra})

    resid = torch.randn(TOKENS, D, device=dev)
    branch = torch.randn(TOKENS, D, device=dev, dtype=bf)
    gamma = torch.randn(D, device=dev, dtype=bf)
    beta = torch.randn(D, device=dev, dtype=bf)
    add("train.residual_add.bf16", lambda: resid + branch)
    add("train.cast.bf16", lambda: resid.to(bf))
    add("train.layernorm_fwd.bf16", lambda: F.layer_norm(resid, (D,), gamma.float(), beta.float()).to(bf))
    add(
        "train.residual_layernorm_fwd.bf16",
        lambda: F.layer_norm(resid + branch, (D,), gamma.float(), beta.float()).to(bf),
    )
    x = resid.clone().requires_grad_(True)
    g32, b32 = gamma.float().requires_grad_(True), beta.float().requires_grad_(True)
    y = F.layer_norm(x, (D,), g32, b32).to(bf)
    dy = torch.randn_like(y)
    add("train.layernorm_bwd.bf16", lambda: torch.autograd.grad(y, (x, g32, b32), dy, retain_graph=True))

    h = 3 * torch.randn(TOKENS, 4 * D, device=dev, dtype=bf)
    add("train.gelu_fwd.bf16", lambda: F.gelu(h, approximate="tanh"))
    hg = h.clone().requires_grad_(True)
    out = F.gelu(hg, approximate="tanh")
    dout = torch.randn_like(out)
    add("train.gelu_bwd.bf16", lambda: torch.autograd.grad(out, hg, dout, retain_graph=True))

    xs = branch
    for n in (VOCAB, PADDED):
        w = 0.02 * torch.randn(n, D, device=dev, dtype=bf)
        add(f"train.lm_head_fwd.{n}.bf16", lambda: xs @ w.t(), vocab=n)
        dl = torch.randn(TOKENS, n, device=dev, dtype=bf)
        add(f"train.lm_head_bwd.{n}.bf16", lambda: (dl @ w, dl.t() @ xs), vocab=n)

    # Cross-entropy forward and backward over bf16 logits, as PyTorch + PEFT
    # runs it (eager F.cross_entropy on the unpadded vocabulary).
    logits = (4 * torch.randn(TOKENS, VOCAB, device=dev, dtype=bf)).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (TOKENS,), device=dev)

    def ce():
        loss = F.cross_entropy(logits, targets)
        return torch.autograd.grad(loss, logits)

    add("train.cross_entropy.bf16", ce, vocab=VOCAB)
    return rows
