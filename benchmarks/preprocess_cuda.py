"""GPU preprocessing throughput (issue 7): images/s for 1600x900 RGB images at the Idefics3
geometry (longest edge 1456, tiles 364 -> 4x3 tiles + global), host uint8 in, device tensors
out, against the CPU op and transformers' image processor, measured side by side in one run.

    python benchmarks/preprocess_cuda.py [--batch 32] [--iters 20] [--dtype bf16]

Prints a note and exits 0 on a machine without CUDA (or without the CUDA kernel). Target on an
H100: >= 2000 images/s. No GPU number has been measured yet (see docs/cuda.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _geometry():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cuda", "_geometry.py")
    spec = importlib.util.spec_from_file_location("_i3k_cuda_test_geometry", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MEAN, STD, RESCALE = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images per call")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--skip-cpu", action="store_true", help="skip the (slow) CPU and transformers baselines")
    args = ap.parse_args(argv)

    from idefics3_kit.ops import _library
    from idefics3_kit.ops.preprocess import alloc_batch, preprocess_into

    if not torch.cuda.is_available() or not _library.has_kernel("preprocess_into", "cuda"):
        print("preprocess_cuda: no CUDA device or no CUDA preprocessing kernel; nothing to measure")
        return 0
    geo = _geometry()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    sizes = [[(args.height, args.width)] for _ in range(args.batch)]
    geometry, tiles = geo.batch_geometry(sizes, 1456, 364)
    print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)")
    print(f"{args.batch} images {args.height}x{args.width} -> {tiles} tiles of 364, {args.dtype} out")

    pv, pm = alloc_batch(args.batch, tiles, 364, dtype=dtype, device="cuda")
    for _ in range(3):  # warm-up (module load, allocator, pinned pool)
        preprocess_into(images, pv, pm, geometry, MEAN, STD, RESCALE)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        preprocess_into(images, pv, pm, geometry, MEAN, STD, RESCALE)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    gpu = args.batch / statistics.median(times)
    # device-only part: images already on the GPU
    dev_images = [im.cuda() for im in images]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dev_times = []
    for _ in range(args.iters):
        start.record()
        preprocess_into(dev_images, pv, pm, geometry, MEAN, STD, RESCALE)
        end.record()
        end.synchronize()
        dev_times.append(start.elapsed_time(end) / 1e3)
    gpu_dev = args.batch / statistics.median(dev_times)
    rows = [("cuda op, host uint8 in (end to end)", gpu), ("cuda op, device uint8 in", gpu_dev)]

    if not args.skip_cpu:
        n_cpu = min(args.batch, 4)
        g_cpu, t_cpu = geo.batch_geometry(sizes[:n_cpu], 1456, 364)
        pv_c = torch.zeros(n_cpu, t_cpu, 3, 364, 364, dtype=dtype)
        pm_c = torch.zeros(n_cpu, t_cpu, 364, 364, dtype=torch.int64)
        t0 = time.perf_counter()
        preprocess_into(images[:n_cpu], pv_c, pm_c, g_cpu, MEAN, STD, RESCALE)
        rows.append((f"cpu op ({torch.get_num_threads()} threads)", n_cpu / (time.perf_counter() - t0)))
        try:
            from transformers import Idefics3ImageProcessor

            proc = Idefics3ImageProcessor()
            arrs = [[im.numpy()] for im in images[:n_cpu]]
            t0 = time.perf_counter()
            proc(arrs, return_tensors="pt")
            rows.append(("transformers Idefics3ImageProcessor", n_cpu / (time.perf_counter() - t0)))
        except Exception as exc:  # transformers is a test-only dependency
            print(f"(transformers baseline skipped: {type(exc).__name__}: {exc})")
    print(f"{'path':44s} {'images/s':>10s} {'vs cuda':>8s}")
    for name, ips in rows:
        print(f"{name:44s} {ips:10.1f} {gpu / ips:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
