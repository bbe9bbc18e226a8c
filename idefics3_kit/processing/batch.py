"""The dict the processor and the tokenizer return (transformers' BatchFeature / BatchEncoding):
attribute access, ``.to(device or dtype)``, and the tensor type conversion (``return_tensors``)."""

from __future__ import annotations

import numpy as np
import torch

TENSOR_TYPES = ("pt", "np", None)


class BatchFeature(dict):
    """A dict of model inputs with attribute access and ``.to(device or dtype)``.

    ``to(dtype)`` casts only floating tensors (pixel_values), so integer ids and masks stay
    integers. The processor adds ``image_plans`` (an attribute, not a key, so ``model(**batch)``
    stays clean): one ``TilePlan`` per image.
    """

    image_plans: list  # set by the processor (read through __getattr__ otherwise)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchFeature":
        """Every torch tensor or nested list of numbers as ``tensor_type`` ("pt", "np" or None: lists)."""
        check_tensor_type(tensor_type)
        for key, value in self.items():
            self[key] = as_tensor_type(value, tensor_type, key)
        return self


BatchEncoding = BatchFeature  # transformers' name for a tokenizer's output


def check_tensor_type(tensor_type) -> None:
    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r} (TensorFlow, JAX and MLX "
                         "tensors are not produced here; convert from numpy)")


def as_tensor_type(value, tensor_type: str | None, key: str = "value"):
    """A tensor, array or rectangular nested list as ``tensor_type``; other values unchanged."""
    if tensor_type is None:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return value.tolist()
        return value
    if isinstance(value, torch.Tensor):
        return value if tensor_type == "pt" else value.cpu().numpy()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value) if tensor_type == "pt" else value
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(f"{key}: rows of different lengths cannot be one tensor; pass padding=True") from None
        if array.dtype == object:
            raise ValueError(f"{key}: rows of different lengths cannot be one tensor; pass padding=True")
        if array.dtype.kind in "iub":
            array = array.astype(np.int64)
        return torch.from_numpy(array) if tensor_type == "pt" else array
    return value
