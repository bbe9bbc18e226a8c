"""The OpenVINO leg of benchmarks/ttft.py, run with the OpenVINO venv's python (docs/performance.md).

optimum-intel pins an older transformers than ours, so this runs in its own environment and talks to
ttft.py over a line protocol:

    python _openvino_worker.py CHECKPOINT IMAGE.png {bf16|fp32} THREADS

exports CHECKPOINT with optimum-intel, then prints "ready <seconds the export and load took>";
each line "run <n_images> <prompt as JSON>" is answered "<seconds> <first token id>", the seconds
of processor(text, images) + generate(max_new_tokens=1, greedy) over n_images copies of IMAGE.png;
"quit" exits. A failure is
answered "error: ..." and the worker exits 1. Library output goes to stderr, so stdout carries only
the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import time


def load_processor(path: str):
    """transformers' Idefics3Processor with the PIL image processor, as the other legs use.

    Built by hand from the checkpoint's files: they are written by a newer transformers (the image
    processor nested in processor_config.json, a v5 tokenizer_config.json) than the one here.
    """
    from transformers import Idefics3Processor, PreTrainedTokenizerFast

    try:  # transformers 5: the PIL backend has its own class
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor as Images

    with open(os.path.join(path, "processor_config.json")) as f:
        config = json.load(f)
    images = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        special = {k: v for k, v in json.load(f).items() if k in ("bos_token", "eos_token", "pad_token", "padding_side")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), **special)
    return Idefics3Processor(image_processor=Images(**images), tokenizer=tokenizer, image_seq_len=config["image_seq_len"])


def serve(path: str, image_path: str, precision: str, threads: int, proto) -> None:
    import torch
    from optimum.intel import OVModelForVisualCausalLM
    from PIL import Image

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = OVModelForVisualCausalLM.from_pretrained(path, export=True, ov_config={
        "INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[precision],
        "INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1"})
    processor = load_processor(path)
    image = Image.open(image_path).convert("RGB")
    print(f"ready {time.perf_counter() - t:.1f}", file=proto)
    for line in sys.stdin:
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "quit":
            return
        if cmd != "run":
            raise ValueError(f"unknown command {line.strip()!r}")
        n_images, _, prompt = rest.partition(" ")
        text = json.loads(prompt)
        t = time.perf_counter()
        batch = processor(text=[text], images=[[image] * int(n_images)], return_tensors="pt")
        ids = model.generate(**batch, max_new_tokens=1, do_sample=False)
        print(f"{time.perf_counter() - t:.6f} {int(ids[0, -1])}", file=proto)


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's stdout ...
    os.dup2(2, 1)  # ... and everything else (python or native) printed to stdout goes to stderr
    try:
        path, image_path, precision, threads = sys.argv[1:]
        serve(path, image_path, precision, int(threads), proto)
    except Exception as e:  # noqa: BLE001 (one line for the parent, the traceback on stderr)
        import traceback

        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}".replace("\n", " "), file=proto)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
