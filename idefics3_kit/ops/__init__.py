"""The Python face of the compiled kernels: one file per op family.

Each op has a reference PyTorch function (its specification), a Python wrapper that runs the
compiled implementation (``torch.ops.idefics3_kit.*``, from the ``idefics3_kit._C`` extension)
where ``fast_path.usable`` allows it and the ordinary PyTorch code otherwise, and a fake kernel
so it traces under torch.compile. Nothing outside this package calls ``torch.ops`` directly.

``backend()`` says whether the compiled implementations run; ``IDEFICS3_KIT_FORCE_REFERENCE=1``
(or ``use_reference()``) forces the reference ops.
"""

from . import _library, fast_path  # noqa: F401  (ops._library, ops.fast_path for callers)
from .activation import gelu_tanh_, gelu_tanh_ref
from ._library import backend, build_info, extension_error, has_extension, use_reference
from .attention import attention, attention_ref
from .decode import decode_layers
from .dense_linear import FUSED_ACTIVATIONS as dense_activations
from .dense_linear import conv2d, dense, gated, patch_embed
from .matmul import decode_linear, decode_linear_ref, linear, linears, prepare_decode, unpack
from .memory import empty_pooled, release_pooled
from .norm import rms_norm, rms_norm_ref
from .preprocess import preprocess_into, resize_u8, tile_count
from .reduce import argmax_last

__all__ = ["argmax_last", "attention", "attention_ref", "backend", "build_info", "conv2d", "decode_layers",
           "decode_linear", "decode_linear_ref", "dense", "dense_activations", "empty_pooled",
           "extension_error", "fast_path", "gated", "gelu_tanh_", "gelu_tanh_ref", "has_extension", "linear",
           "linears", "patch_embed", "preprocess_into", "prepare_decode", "release_pooled", "resize_u8", "rms_norm",
           "rms_norm_ref", "tile_count", "unpack", "use_reference"]
