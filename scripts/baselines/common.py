"""Timing shared by every PyTorch baseline: CUDA-event medians after warm-up,
the same protocol as lorafuse's `cuda::bench::median_ms`."""
import torch


def time_us(fn, warmup=5, runs=30):
    """Median time of `fn()` in microseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e3
