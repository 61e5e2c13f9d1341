"""Measuring helpers of ``scripts/benchmark.py``: medians of repeated calls, a case in a fresh process, peak
memory, and the matrix-product and convolution peaks the achieved rates are compared with."""
import multiprocessing
import resource
import statistics
import time

import torch
import torch.nn.functional as F

PEAK_SIZE = 4096


def timed(function, repeats):
    """Median wall time of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def in_child(function, *args):
    """Run ``function(*args)`` in a fresh process (so that its peak memory is its own) and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def peak_memory_mib(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device):
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def rate(function, flops, device, repeats):
    def run():
        function()
        synchronize(device)

    run()
    seconds, _ = timed(run, repeats)
    return flops / seconds


def measured_peaks(device, dtype, channels_last, repeats=5):
    """``(matrix product, convolution)`` FLOP/s measured now: a PEAK_SIZE² ``torch.mm`` in ``dtype``, and a
    3x3 convolution of the network's shape (2 x 256 x 65², 256 filters) in ``dtype`` and the case's memory
    format. On CPUs where the BLAS behind ``torch.mm`` is slower than oneDNN's convolutions (MKL on AMD), the
    second is the achievable rate."""
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)
    matmul = rate(lambda: torch.mm(a, b), 2 * PEAK_SIZE ** 3, device, repeats)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 256, 65, 65, device=device).to(dtype).contiguous(memory_format=memory_format)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=memory_format)
    conv = rate(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 256 * 256 * 9 * 65 * 65, device, repeats)
    return matmul, conv
