#!/usr/bin/env python3
"""PyTorch timings of the work each lorafuse bench does, on the same GPU and
in the same run, so every bench can print its ratio to what users would
otherwise run.

Every module in scripts/baselines/ (but common.py) defines
`run(dev) -> list[dict]`; each dict has a "key" (the row name a bench looks
up with `lorafuse::cuda::bench::torch_baseline_us`) and "us" (median
microseconds), plus whatever describes the row. This script runs them all
(or `--only a,b`) and writes {"device", "torch", "rows": {key: row}} to
--out, and one JSON line per row to stdout. A module that fails is reported
on stderr and the others still run.

    python3 scripts/torch_baselines.py --out baselines.json
    LORAFUSE_TORCH_BASELINES=baselines.json target/release/deps/lowrank-... --bench
"""
import argparse
import importlib
import json
import pathlib
import sys
import traceback

import torch

here = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(here / "baselines"))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", required=True, help="JSON file the benches read (LORAFUSE_TORCH_BASELINES)")
parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
args = parser.parse_args()

if not torch.cuda.is_available():
    sys.exit("torch_baselines: no CUDA device visible to torch")
only = {m for m in args.only.split(",") if m}
names = sorted(p.stem for p in (here / "baselines").glob("*.py") if p.stem != "common")
rows, failed = {}, []
for name in names:
    if only and name not in only:
        continue
    torch.manual_seed(0)
    try:
        for row in importlib.import_module(name).run("cuda"):
            row["module"] = name
            rows[row["key"]] = row
            print(json.dumps(row), flush=True)
    except Exception:  # one broken baseline must not hide the others
        traceback.print_exc()
        failed.append(name)
    torch.cuda.empty_cache()
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
if failed:
    sys.exit(f"torch_baselines: failed modules: {', '.join(failed)}")
