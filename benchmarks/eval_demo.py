"""Exact-match accuracy of the shipped demo model on freshly generated images.

    python benchmarks/eval_demo.py [--count 200] [--first-seed N] [--model DIR] [--quantization int8|int4]
                                   [--group-size 64]

The images are drawn from seeds the training never used (training draws from 0 upward;
evaluation from 20,000,000 by default, apart from the test suite's 10,000,000 range).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from idefics3_kit import VLM, Processor  # noqa: E402
from idefics3_kit.recipes.demo.model import evaluate, shipped_model_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="number of fresh images (default 200)")
    parser.add_argument("--first-seed", type=int, default=20_000_000, help="seed of the first image")
    parser.add_argument("--model", default=shipped_model_dir(), help="checkpoint directory (default: shipped)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None,
                        help="quantize the decoder and LM head while loading (docs/quantization.md)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default 64)")
    parser.add_argument("--batch-size", type=int, default=50,
                        help="images per generate call (default 50); a quantized model's decode steps quantize "
                             "their activations only at <= 8 rows (ops.quant.MAX_ROWS), so use 8 to measure that")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = VLM.from_pretrained(args.model, quantization=args.quantization, group_size=args.group_size).eval()
    processor = Processor.from_pretrained(args.model)
    start = time.perf_counter()
    result = evaluate(model, processor, args.count, args.first_seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    print(f"model: {args.model} ({model.num_parameters():,} parameters)"
          + (f", quantized {args.quantization}" + (f" group {args.group_size or 64}" if args.quantization == "int4" else "")
             if args.quantization else "") + f", batch size {args.batch_size}")
    print(f"exact match: {result['correct']}/{result['count']} = {100 * result['accuracy']:.1f}% "
          f"({elapsed:.1f} s, {args.count / elapsed:.1f} images/s)")
    for kind, acc in result["per_kind"].items():
        print(f"  {kind:7s} {100 * acc:5.1f}%")
    wrong = [(e, p) for e, p in result["examples"] if p != e.answer][:8]
    for example, prediction in wrong:
        print(f"  wrong: {example.question!r} -> {prediction!r} (expected {example.answer!r})")
    print("target: >= 90%: " + ("met" if result["accuracy"] >= 0.9 else "NOT met"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
