#!/usr/bin/env python3
"""Training-speed baseline: PyTorch + Hugging Face PEFT on a GPT-2-small-shaped
model with random weights, eager and torch.compile, for the comparison in
BENCHMARKS.md (lorafuse's trainer is timed on the same GPU in the same run of
scripts/gpu-check.sh).

Setup (the summation paper's): LoRA r=4, alpha=64 on attn.c_attn,
attn.c_proj, mlp.c_fc, mlp.c_proj; seq 1024; AdamW; bf16 autocast with f32
master weights for the adapter. Tied-LoRA has no PEFT implementation; VeRA
and (if this PEFT has it) Uni-LoRA are timed too.

Prints one JSON line per configuration: tokens/s (median over timed steps),
peak memory, step time. Needs torch, transformers, peft; downloads nothing.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def build_model(args):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.seq,
                     vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def attach(model, kind, args):
    import peft

    common = dict(target_modules=TARGETS, fan_in_fan_out=True)
    if kind == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, **common)
    elif kind == "vera":
        config = peft.VeraConfig(r=args.vera_rank, vera_dropout=0.0, **common)
    elif kind == "unilora":
        if not hasattr(peft, "UniLoraConfig"):
            return None
        config = peft.UniLoraConfig(theta_d_length=args.unilora_d, **common)
    else:
        raise ValueError(kind)
    return peft.get_peft_model(model, config)


def time_training(model, args, compiled):
    device = torch.device("cuda")
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    step_fn = model
    if compiled:
        step_fn = torch.compile(model)
    gen = torch.Generator(device=device).manual_seed(1)

    def step():
        x = torch.randint(0, 50257, (args.batch, args.seq), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {
        "tokens_per_s": args.batch * args.seq / (ms * 1e-3),
        "step_ms": ms,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": trainable,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--vera-rank", type=int, default=256)
    p.add_argument("--unilora-d", type=int, default=23040)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kinds", default="lora,vera,unilora")
    args = p.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for kind in args.kinds.split(","):
        for compiled in (False, True):
            try:
                model = attach(build_model(args), kind, args)
            except Exception as e:  # e.g. an older PEFT's VeRA refuses layers of different shapes
                print(json.dumps({"kind": kind, "skipped": f"{type(e).__name__}: {e}"}), flush=True)
                break
            if model is None:
                print(json.dumps({"kind": kind, "skipped": "this PEFT has no UniLoraConfig"}), flush=True)
                break
            t0 = time.time()
            try:
                result = time_training(model, args, compiled)
            except Exception as e:  # report and go on: one failing mode must not hide the others
                result = {"error": f"{type(e).__name__}: {e}"}
            result.update(kind=kind, mode="torch.compile" if compiled else "eager", wall_s=round(time.time() - t0, 1),
                          batch=args.batch, seq=args.seq)
            print(json.dumps(result), flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
