#!/usr/bin/env python3
"""Puts lorafuse's training speed (benches/train.rs output) next to PyTorch +
PEFT's (scripts/peft_speed.py output) from the same GPU run, as ratios.

Usage: train_speed_table.py BENCH_TRAIN_OUTPUT PEFT_SPEED_JSONL

Both inputs are read line by line; lines that are not JSON objects (criterion
text, warnings) are ignored. Methods are matched by family: lora <-> lora,
vera <-> vera, unilora:<d> <-> unilora; Tied-LoRA has no PEFT counterpart.
The issue's goals: >= 2.0x PEFT eager tokens/s, >= 1.3x torch.compile, lower
peak memory. Standard library only.
"""
import json
import sys


def json_lines(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError as e:
        print(f"cannot read {path}: {e}")
    return out


def family(method):
    return method.split(":")[0]


def label(r):
    # A graph-replay row (benches/train.rs, "graph": true) times the same
    # method with the step replayed as one CUDA graph; a caller-buffer row
    # ("linear_path": "CallerBuffers") the same method without the packed
    # one-GEMM layout; a one-piece row ("lm_head_whole": true) the same
    # method with the LM head's logits in one buffer instead of row chunks.
    label = r["method"]
    if r.get("linear_path") == "CallerBuffers":
        label += "+caller"
    if r.get("lm_head_whole"):
        label += "+head1"
    return label + ("+graph" if r.get("graph") else "")


def fmt(x, spec):
    """`x` formatted, or a dash of the same width when it is missing."""
    if isinstance(x, (int, float)):
        return format(x, spec)
    width = spec.split(".")[0]
    return format("-", ">" + width) if width else "-"


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    ours = [r for r in json_lines(argv[1]) if r.get("bench") == "lorafuse-train" and "method" in r]
    peft = [r for r in json_lines(argv[2]) if "kind" in r and "tokens_per_s" in r]
    if not ours:
        print(f"no lorafuse-train results in {argv[1]}")
        return 1
    base = {}
    for r in peft:
        base[(r["kind"], r.get("mode"))] = r
    header = (f"{'method':<16} {'prec':>4} {'lorafuse tok/s':>14} {'peft eager':>11} {'x eager':>8} {'compile':>11} "
              f"{'x compile':>9} {'lf peak GiB':>11} {'peft GiB':>9}  fwd/bwd/opt ms")
    print(header)
    for r in ours:
        eager = base.get((family(r["method"]), "eager"), {})
        comp = base.get((family(r["method"]), "torch.compile"), {})
        tps = r.get("tokens_per_s")
        ratio = lambda b: tps / b["tokens_per_s"] if tps and b.get("tokens_per_s") else None
        peak = r.get("pool_peak_gib") or r.get("mem_used_after_warmup_gib")
        split = "/".join(fmt(r.get(k), ".1f") for k in ("forward_ms", "backward_ms", "optimizer_ms"))
        print(f"{label(r):<16} {r.get('precision', '-'):>4} {fmt(tps, '14.0f')} {fmt(eager.get('tokens_per_s'), '11.0f')} "
              f"{fmt(ratio(eager), '8.2f')} {fmt(comp.get('tokens_per_s'), '11.0f')} {fmt(ratio(comp), '9.2f')} "
              f"{fmt(peak, '11.2f')} {fmt(eager.get('peak_mem_gib'), '9.2f')}  {split}")
    # Where the time goes: the per-op breakdown of one step (CUDA events
    # between the trainer's op marks), largest first.
    for r in ours:
        ops = r.get("op_ms")
        if not isinstance(ops, dict) or not ops:
            continue
        total = sum(v for v in ops.values() if isinstance(v, (int, float))) or 1.0
        print(f"\nper-op time, {label(r)} {r.get('precision', '')}: {total:.1f} ms in one step")
        for name, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<24} {ms:9.2f} ms  {100.0 * ms / total:5.1f}%")
    shapes = {(r.get("batch"), r.get("seq")) for r in ours}
    print(f"lorafuse batch x seq: {sorted(shapes)}; make sure peft_speed.py ran with the same --batch/--seq")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
