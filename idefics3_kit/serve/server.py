"""Loading a checkpoint for serving and running uvicorn: what ``idefics3-kit serve`` calls."""

from __future__ import annotations

import os

import torch

from ..model import SERVING_DECODER_PACK_BYTES, VLM
from ..processing import Processor
from .app import create_app
from .settings import ServeSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("none", "int8", "int4")


def load(model_dir: str, dtype: str = "fp32", device: str = "cpu", quantization: str = "none"):
    """(model, processor) ready to serve. ``quantization`` "int8" / "int4": the decoder's linears
    quantized weight-only as they load (docs/quantization.md); a checkpoint saved quantized loads
    as it is with "none"."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    model = VLM.from_pretrained(model_dir, dtype=DTYPES[dtype], device=device,
                                quantization=None if quantization == "none" else quantization)
    processor = Processor.from_pretrained(model_dir)
    model.enable_feature_cache()  # a follow-up question about the same image skips the vision tower
    # CPU bf16: the tower's matmuls (and a small decoder's prefill) skip the per-call weight re-layout (0 B elsewhere)
    model.enable_packed_weights(decoder_max_bytes=SERVING_DECODER_PACK_BYTES)
    return model.eval(), processor


def run(model_dir: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, dtype: str = "fp32",
        device: str = "cpu", quantization: str = "none", log_level: str = "info") -> None:
    """Load and serve until interrupted."""
    import uvicorn

    model, processor = load(model_dir, dtype=dtype, device=device, quantization=quantization)
    app = create_app(model, processor, settings)
    print(f"serving {os.path.abspath(model_dir)} as {settings.model_name!r} on http://{host}:{port}/v1 "
          f"(max batch {settings.max_batch_size}, api key {'on' if settings.api_key else 'off'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
