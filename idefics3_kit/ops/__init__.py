"""The Python face of the compiled kernels.

Each op has a reference PyTorch function (its specification and the fallback) and, when the
``idefics3_kit._C`` extension is built and loaded, a compiled implementation registered as
``torch.ops.idefics3_kit.*``. Components call only the functions exported here, never
``torch.ops`` directly. ``backend()`` says which implementation runs; setting the
environment variable ``IDEFICS3_KIT_FORCE_REFERENCE=1`` (or ``use_reference()``) forces the
reference ops.
"""

from . import _library
from ._library import backend, build_info, extension_error, has_extension, use_reference
from .attention import attention, attention_ref
from .linear import decode_linear, decode_linear_ref
from .memory import empty_pooled, release_pooled
from .norm import rms_norm, rms_norm_ref

_library.has_extension()  # load the extension now (quietly) so torch.ops.idefics3_kit.* exist

__all__ = ["attention", "attention_ref", "backend", "build_info", "decode_linear", "decode_linear_ref",
           "empty_pooled", "extension_error", "has_extension", "release_pooled", "rms_norm", "rms_norm_ref",
           "use_reference"]
