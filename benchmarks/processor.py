"""Processor speed against transformers' Idefics3Processor (PIL backend), side by side in one run.

    python benchmarks/processor.py [--geometry smolvlm256m|smolvlm|idefics3|all] [--repeat 3]

Both processors load the same tiny checkpoint (tokenizer trained on the spot, real geometry and
image_seq_len) and process the same images: the test photos and two synthetic sizes. Printed per
geometry: best-of-N CPU and wall milliseconds per image (interleaved runs) and the ratio
transformers / ours (> 1: we are faster); the summary uses the CPU-time ratio, which other users
of a shared machine disturb least. Outputs are checked for equality first, so the ratio compares equal work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from idefics3_kit import Processor, ops  # noqa: E402
from tests.processor_checkpoints import REAL_GEOMETRIES, gradient_image, hf_processor, make_checkpoint  # noqa: E402


def images():
    from PIL import Image

    photos = [Image.open(ROOT / "tests" / "data" / name).convert("RGB") for name in ("chelsea.png", "camera.png")]
    return photos + [gradient_image(1600, 900), gradient_image(300, 300)]


def time_per_image(fns, batch, repeat: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per image for each function, best of ``repeat``.

    Runs are interleaved so that load from other processes on the machine hits both sides alike;
    CPU time (this process, all threads) is the steadier number on a shared machine.
    """
    for fn in fns:
        fn(batch)  # warm-up
    runs = [[] for _ in fns]
    for _ in range(repeat):
        for fn, times in zip(fns, runs):
            wall, cpu = time.perf_counter(), time.process_time()
            fn(batch)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return [(min(t[0] for t in times) / len(batch), min(t[1] for t in times) / len(batch)) for times in runs]


def bench(name: str, repeat: int, workdir: str) -> float:
    longest, tile, seq_len = REAL_GEOMETRIES[name]
    path = make_checkpoint(os.path.join(workdir, name), longest_edge=longest, tile=tile, image_seq_len=seq_len)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    batch = images()
    prompt = "<image>Describe this image."

    def run_ours(imgs):
        return [ours(text=prompt, images=im) for im in imgs]

    def run_hf(imgs):
        return [hf(text=prompt, images=im, return_tensors="pt") for im in imgs]

    for a, b in zip(run_ours(batch[:2]), run_hf(batch[:2])):  # equal work, equal results
        assert all(torch.equal(a[k], torch.as_tensor(b[k])) for k in a), "outputs differ"
    (wall_ours, cpu_ours), (wall_hf, cpu_hf) = time_per_image([run_ours, run_hf], batch, repeat)
    ratio = cpu_hf / cpu_ours
    print(f"{name:12s} L={longest} S={tile}: CPU ours {1e3 * cpu_ours:6.1f} vs transformers {1e3 * cpu_hf:6.1f} "
          f"ms/image, ratio {ratio:.2f}x | wall {1e3 * wall_ours:6.1f} vs {1e3 * wall_hf:6.1f}, "
          f"ratio {wall_hf / wall_ours:.2f}x")
    return ratio


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="smolvlm256m", choices=[*REAL_GEOMETRIES, "all"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"preprocess backend: {ops.backend()}, torch threads: {torch.get_num_threads()}, "
          f"images: 2 photos + 1600x900 + 300x300 gradients")
    names = list(REAL_GEOMETRIES) if args.geometry == "all" else [args.geometry]
    with tempfile.TemporaryDirectory() as workdir:
        ratios = [bench(name, args.repeat, workdir) for name in names]
    print(f"ratio (transformers CPU time / ours): {min(ratios):.2f}x worst, {max(ratios):.2f}x best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
