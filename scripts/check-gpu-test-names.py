#!/usr/bin/env python3
"""Fails when a test that opens a GPU is not named so that the GPU run finds it.

scripts/gpu-check.sh runs, on the GPU machine, only the tests whose name
contains `gpu_` (a test binary cannot tell a GPU test from a CPU one
otherwise). A test that asks for the device (`gpu_or_skip`, `Gpu::new`,
`lorafuse::cuda::probe`, `test_device!`) under another name would print
`skipped:` here and then never run there either. Standard library only.
"""
import glob
import re
import sys

TEST = re.compile(r"#\[test\]\s*(?:#\[[^\]]*\]\s*)*fn (\w+)\(\)[^{]*\{")
OPENS_GPU = re.compile(r"gpu_or_skip|Gpu::new|cuda::probe\(\)|\bprobe\(\)|test_device!")
END = re.compile(r"\n(    )?\}\n")

bad = []
for path in sorted(glob.glob("tests/*.rs") + glob.glob("src/**/*.rs", recursive=True)):
    text = open(path).read()
    for m in TEST.finditer(text):
        body = text[m.end():]
        end = END.search(body)
        body = body[: end.start()] if end else body
        if OPENS_GPU.search(body) and "gpu_" not in m.group(1):
            bad.append(f"{path}: {m.group(1)}")
if bad:
    print("tests that open a GPU but whose name lacks `gpu_` (scripts/gpu-check.sh would never run them):")
    print("\n".join("  " + b for b in bad))
    print("rename them to start with gpu_")
    sys.exit(1)
print("GPU test names: ok")
