"""VLM: a vision encoder, a connector and a decoder from the registry, wired together.

Data flow (shapes for one batch):
    pixel_values [B, T, 3, S, S] -> drop all-zero padding tiles -> [N, 3, S, S]
    vision(pixel, patch_mask [N, S/p, S/p])         -> [N, (S/p)², Dv]
    connector                                        -> [N, (S/p)²/s², Dt]
    decoder.embed(input_ids) [B, L, Dt]; features scattered into the <image> positions
    decoder                                           -> logits [B, L, V]
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import files, registry
from .config import VLMConfig
from .feature_cache import DEFAULT_MAX_BYTES, VisionFeatureCache, weights_signature
from .generation import generate as _generate
from .hf import hub, parts, weights
from .hf.parts import resolve_dtype
from .ops import dense_linear, fast_path, quant
from .streaming import stream as _stream

CPU_VISION_TOKENS_PER_THREAD = 1024  # the vision tower's patch tokens per call per CPU thread (run_vision_tower)
# chat and the server pack the decoder's linears too when that copy takes at most this (small
# models: SmolVLM-256M's decoder layers 212 MB, its prefill 4-8% faster; an 8B decoder's would be 14 GB)
SERVING_DECODER_PACK_BYTES = 1 << 30


@dataclass
class VLMOutput:
    logits: torch.Tensor | None  # [B, L_kept, V]; None when forward(loss_only=True) computed only the loss
    loss: torch.Tensor | None = None
    hidden_states: tuple | None = None
    image_hidden_states: torch.Tensor | None = None  # [N_real_tiles, S_img, Dt]

    _ORDER = ("loss", "logits", "hidden_states", "image_hidden_states")  # transformers' field order

    def to_tuple(self) -> tuple:
        """The fields that are set, in transformers' order: ``out[0]`` is the loss when labels were
        given, else the logits (Idefics3CausalLMOutputWithPast)."""
        return tuple(getattr(self, name) for name in self._ORDER if getattr(self, name) is not None)

    def __getitem__(self, key):  # out["logits"] and out[0] like transformers' ModelOutput
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   num_items_in_batch=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss: float32 logits, labels shifted left, mean over labels != -100;
    with ``num_items_in_batch`` the sum divided by it instead (a trainer's count over every
    micro-batch and process of a step, so that the step's loss is one mean over all its tokens)."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(logits.device)  # [B, L], shifted left
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / _label_count(flat_labels != ignore_index)


def _label_count(labelled: torch.Tensor) -> torch.Tensor:
    """How many positions have a label, at least 1: a batch without any (every label -100) gets
    loss 0 and a warning, where transformers' mean over nothing gives NaN (docs/reliability.md)."""
    count = labelled.sum()
    if not torch.compiler.is_compiling() and int(count) == 0:
        warnings.warn("every label is -100 (ignored): the loss is 0 and there is nothing to learn from this batch",
                      stacklevel=3)
    return count.clamp_min(1)


def labelled_positions_loss(head, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                            ignore_index: int = -100) -> torch.Tensor:
    """``causal_lm_loss`` with the LM head run only where a label is: hidden [B, L, D] -> the
    positions whose next token is labelled [N, D] -> logits [N, V] (float32) -> cross entropy."""
    targets = labels[:, 1:]  # [B, L-1]: the label of position i is labels[i + 1]
    keep = targets != ignore_index
    logits = head(hidden[:, :-1][keep]).float()  # [N, V]
    total = F.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else _label_count(keep))


class VLM(nn.Module):
    """An Idefics3-style vision-language model assembled from registered components."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        if not isinstance(config, VLMConfig):
            raise TypeError(f"VLM expects a VLMConfig, got {type(config).__name__}")
        self.config = config
        self.vision = registry.create("vision", config.vision.name, config.vision)
        self.connector = registry.create("connector", config.connector.name, config.connector)
        self.decoder = registry.create("decoder", config.decoder.name, config.decoder)
        self.generation_config: dict = {}
        self.feature_cache: VisionFeatureCache | None = None  # off: enable_feature_cache
        self.quantization_config: dict | None = None  # set by quantize() / a quantized checkpoint
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """transformers' initialisation for a model trained from scratch.

        Linear, conv and embedding weights ~ N(0, std), biases 0, norms 1/0. PyTorch's defaults
        (embeddings ~ N(0, 1)) make the image features a near-constant vector far larger than
        the text embeddings, and a from-scratch vision tower then never learns. A no-op on the
        meta device (checkpoint loading assigns every tensor anyway).
        """
        if next(self.parameters()).is_meta:
            return
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    module.weight.normal_(0.0, std)
                    bias = getattr(module, "bias", None)
                    if bias is not None:
                        bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()

    # ---- properties ------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def image_seq_len(self) -> int:
        return self.config.image_seq_len

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters in the model (shared tensors counted once), as transformers counts them;
        ``parameter_counts()`` gives them per component."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in embeddings)

    def parameter_counts(self) -> dict:
        """Parameter counts per component and in total (shared tensors counted once)."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in ("vision", "connector", "decoder")}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # ---- transformers' embedding surface ------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, embeddings: nn.Module) -> None:
        self.decoder.set_input_embeddings(embeddings)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def tie_weights(self) -> None:
        self.decoder.tie_weights()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """Grow (or shrink) the vocabulary (embeddings, LM head, config) like transformers; returns
        the new input embeddings. New rows are the mean of the existing ones (transformers draws
        them from a narrow normal around that mean); ``mean_resizing=False`` is refused."""
        if not mean_resizing:
            raise ValueError("resize_token_embeddings: only mean_resizing=True is supported")
        size = self.config.decoder.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(size, int) or size <= self.image_token_id:
            raise ValueError(f"resize_token_embeddings: {size!r} tokens would drop the <image> token "
                             f"(id {self.image_token_id})")
        if size != self.config.decoder.vocab_size:
            resize = getattr(self.decoder, "resize_token_embeddings", None)
            if not callable(resize):
                raise TypeError(f"the decoder {type(self.decoder).__name__} cannot resize its vocabulary")
            resize(size)
            self.config = self.config.replace(decoder=self.decoder.config)
        return self.get_input_embeddings()

    # ---- training ---------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each vision and decoder layer's activations in the backward pass instead of
        keeping them (transformers' name): activation memory drops to about one layer's, for one
        more forward's time. Gradients are the same (non-reentrant ``torch.utils.checkpoint``)."""
        if gradient_checkpointing_kwargs and gradient_checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs: only use_reentrant=False is supported")
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules() if m is not self)

    def _set_gradient_checkpointing(self, on: bool) -> None:
        parts = [m for m in self.modules() if m is not self and hasattr(m, "gradient_checkpointing")]
        if on and not parts:
            raise ValueError("none of this model's components supports gradient checkpointing")
        for module in parts:
            setattr(module, "gradient_checkpointing", on)  # a plain attribute, not a Tensor | Module

    # ---- images ----------------------------------------------------------------------------
    def _check_pixels(self, pixel_values: torch.Tensor, pixel_attention_mask) -> None:
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, tiles, channels, height, width] (5-D), "
                             f"got shape {tuple(pixel_values.shape)}")
        channels = getattr(self.config.vision, "num_channels", 3)
        if pixel_values.shape[2] != channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[2]} channels, the vision encoder "
                             f"expects {channels} (shape {tuple(pixel_values.shape)})")
        if pixel_values.shape[0] == 0 or pixel_values.shape[1] == 0:
            raise ValueError(f"pixel_values has no tiles (shape {tuple(pixel_values.shape)})")
        patch = self.vision.patch_size
        if pixel_values.shape[3] < patch or pixel_values.shape[4] < patch:
            raise ValueError(f"pixel_values height/width {tuple(pixel_values.shape[3:])} are smaller than "
                             f"the patch size {patch}")
        size = getattr(self.config.vision, "image_size", None)
        if size is not None and tuple(pixel_values.shape[3:]) != (size, size):
            raise ValueError(f"pixel_values tiles are {pixel_values.shape[3]}x{pixel_values.shape[4]} pixels but the "
                             f"vision encoder takes {size}x{size} tiles (its image_size); the Processor makes them")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must hold the processor's normalized floats, got {pixel_values.dtype} "
                             "(integer pixels would be read as huge values); run the images through the Processor")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values hold NaN or inf values")
        if pixel_attention_mask is not None:
            want = (*pixel_values.shape[:2], *pixel_values.shape[3:])
            if tuple(pixel_attention_mask.shape) != want:
                raise ValueError(f"pixel_attention_mask must have shape {want}, got "
                                 f"{tuple(pixel_attention_mask.shape)}")

    def get_image_features(self, pixel_values: torch.Tensor,
                           pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, T, 3, S, S] (+ mask [B, T, S, S]) -> features [N_real, S_img, Dt].

        Padding tiles (all values exactly 0.0, as the processor writes them) are dropped first, as
        transformers does; the rows follow sample 0's tiles, then sample 1's, ... Under
        torch.compile / torch.export the tiles are instead reordered, real ones first, and every
        tile goes through the tower (static shapes, no graph break): the first N_real rows are the
        same features, and the padding tiles' rows after them are never merged into the text.
        """
        pixels, patch_mask = self.real_tiles(pixel_values, pixel_attention_mask)
        cache = self.feature_cache
        if cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            params = list(self.vision.parameters()) + list(self.connector.parameters())
            return cache.features(pixels, patch_mask, weights_signature(params), self.encode_tiles)
        return self.encode_tiles(pixels, patch_mask)

    def real_tiles(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None):
        """(tiles [N, 3, S, S] in the model's dtype, patch mask [N, S/p, S/p] or None): the real
        tiles of a batch [B, T, 3, S, S] (padding tiles dropped, see get_image_features)."""
        self._check_pixels(pixel_values, pixel_attention_mask)
        b, t = pixel_values.shape[:2]
        pixels = pixel_values.to(self.dtype).reshape(b * t, *pixel_values.shape[2:])  # [B*T, 3, H, W]
        real = (pixels != 0).flatten(1).any(dim=1)  # [B*T]
        if torch.compiler.is_compiling():
            keep = torch.argsort((~real).to(torch.uint8), stable=True)  # [B*T]: real tiles first, in order
        else:
            keep = real.nonzero().squeeze(1)  # [N]: a data-dependent size, fine in eager mode
        pixels = pixels.index_select(0, keep)
        if pixel_attention_mask is None:
            return pixels, None
        pixel_mask = pixel_attention_mask.reshape(b * t, *pixel_attention_mask.shape[2:]).index_select(0, keep)
        p = self.vision.patch_size
        n, h, w = pixel_mask.shape
        gh, gw = h // p, w // p  # pixels past the last whole patch are ignored, as the conv does
        return pixels, pixel_mask[:, :gh * p, :gw * p].reshape(n, gh, p, gw, p).sum(dim=(2, 4)) > 0  # [N, gh, gw]

    def encode_tiles(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        """Vision tower + connector over real tiles [N, 3, S, S] -> features [N, S_img, Dt]."""
        return self.connector(self.run_vision_tower(pixels, patch_mask))

    def run_vision_tower(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        """The vision tower over real tiles [N, 3, S, S] (+ patch mask [N, h, w]) -> [N, S, Dv].

        CPU inference runs the tiles in chunks of ~CPU_VISION_TOKENS_PER_THREAD patch tokens per
        thread (``_tiles_per_call``): a whole image's activations spill the caches (13 tiles of
        SigLIP at 512 px are 13k tokens, 80 MB of MLP activations in bf16). Chunks of two tiles ran
        the SmolVLM-256M tower 1.16x faster on 13 tiles and 1.57x on 26 (bf16, 2 threads; fp32 1.14x
        on 13). Every tile is computed on its own either way; the features differ from one call's by
        float rounding only (a GEMM's blocking depends on its row count).
        """
        if patch_mask is not None and not torch.compiler.is_compiling() and bool(patch_mask.all()):
            patch_mask = None  # every patch real: the same result through faster attention (eager only)
        n, step = pixels.shape[0], self._tiles_per_call(pixels)
        if step >= n:
            return self.vision(pixels, patch_mask)
        return torch.cat([self.vision(pixels[i:i + step], None if patch_mask is None else patch_mask[i:i + step])
                          for i in range(0, n, step)])

    def _tiles_per_call(self, pixels: torch.Tensor) -> int:
        """How many tiles go through the tower at once: all of them unless this is eager CPU
        inference with no hooks on the tower (a hook, FSDP's included, or a training step sees the
        one call it expects); else ~CPU_VISION_TOKENS_PER_THREAD patch tokens per thread (at least
        two threads' worth)."""
        n = pixels.shape[0]
        if (pixels.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or fast_path.global_hooks() or self.vision._forward_hooks or self.vision._forward_pre_hooks):
            return n
        p = self.vision.patch_size
        tokens = max(1, (pixels.shape[-2] // p) * (pixels.shape[-1] // p))  # patch tokens per tile
        return max(1, CPU_VISION_TOKENS_PER_THREAD * max(2, torch.get_num_threads()) // tokens)

    # ---- the vision-feature cache ----------------------------------------------------------
    def enable_feature_cache(self, max_bytes: int = DEFAULT_MAX_BYTES) -> VisionFeatureCache:
        """Keep the features of image tiles seen before (inference only), so a second question
        about the same image skips the vision tower. Bounded (least recently used entries go
        first); entries are dropped when the weights change. See idefics3_kit/feature_cache.py."""
        self.feature_cache = VisionFeatureCache(max_bytes)
        return self.feature_cache

    def disable_feature_cache(self) -> None:
        self.feature_cache = None

    # ---- packed weights (CPU bf16 inference) -------------------------------------------------
    PACKABLE_PARTS = ("vision", "connector", "decoder")

    def enable_packed_weights(self, parts: tuple[str, ...] = ("vision", "connector"), *,
                              decoder_max_bytes: int = 0) -> int:
        """Keep a oneDNN-packed copy of the bf16 linear weights of these parts for CPU inference
        (``ops.dense_linear.pack_weights``): their many-row matmuls skip the weight's re-layout on
        each call (the SmolVLM-256M tower over 13 tiles ~2-4% faster on a 2-core Zen 4, the
        features bit-identical). Costs one more copy of those weights in memory, hence opt-in;
        ``idefics3-kit chat`` and the server turn it on (``SERVING_DECODER_PACK_BYTES``).

        The decoder's one-token steps read the plain weights (their own kernels), so a decoder copy
        only speeds up its prefill (SmolVLM-256M's 892-token prefill 4-8% faster, the logits
        bit-identical) at the price of one more copy of the decoder's linears.
        ``decoder_max_bytes``: also pack the decoder's linears but its output head (which a
        generation's prefill runs on one row per sequence, through the few-row kernels) when that
        copy takes at most this many bytes (a small model's). -> the bytes the copies take (float32
        copies, twice the bf16 bytes, where oneDNN has no bf16 matmul on this CPU and bf16 runs as
        float32: there they also save each weight's upcast per call)."""
        unknown = set(parts) - set(self.PACKABLE_PARTS)
        if unknown:
            raise ValueError(f"enable_packed_weights: unknown parts {sorted(unknown)}; "
                             f"expected some of {self.PACKABLE_PARTS}")
        modules: list[nn.Module] = [getattr(self, part) for part in parts]
        if "decoder" not in parts and decoder_max_bytes > 0:
            head = self.get_output_embeddings()
            body = [m for m in self.decoder.modules() if isinstance(m, nn.Linear) and m is not head]
            if 0 < dense_linear.packable_bytes(body) <= decoder_max_bytes:
                modules += body
        return dense_linear.pack_weights(modules)

    def disable_packed_weights(self) -> None:
        """Drop the packed copies (``enable_packed_weights``)."""
        dense_linear.unpack_weights([self])

    def merge_image_features(self, input_ids, inputs_embeds, features) -> torch.Tensor:
        """Write feature rows into the <image> positions, in (batch, position) order."""
        if input_ids is not None:
            is_image = input_ids == self.image_token_id  # [B, L]
        else:
            image_embed = self.decoder.embed(torch.tensor(self.image_token_id, device=inputs_embeds.device))
            is_image = (inputs_embeds == image_embed).all(-1)
        rows = features.reshape(-1, features.shape[-1])  # [N_real * S_img, Dt]
        if not torch.compiler.is_compiling():  # a count that needs the values: checked in eager mode
            n_tokens = int(is_image.sum())
            if n_tokens != rows.shape[0]:
                per_tile = features.shape[1] if features.dim() == 3 else 1
                raise ValueError(f"{n_tokens} image tokens but {rows.shape[0]} image features "
                                 f"({rows.shape[0] // max(per_tile, 1)} tiles x {per_tile} tokens per tile)")
        return inputs_embeds.masked_scatter(is_image[..., None], rows.to(inputs_embeds.dtype))

    # ---- forward ---------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids checked (shape, dtype, vocabulary); integer dtypes other than int64/int32
        (which the embedding takes) are widened to int64, which is exact."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor [batch, length], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids has no tokens (shape {tuple(input_ids.shape)})")
        if input_ids.numel() and not torch.compiler.is_compiling():  # value checks: eager mode
            lo, hi = int(input_ids.min()), int(input_ids.max())
            vocab = self.decoder.vocab_size
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab}): min {lo}, max {hi}")
        return input_ids if input_ids.dtype in (torch.long, torch.int32) else input_ids.long()

    def embed_inputs(self, input_ids=None, inputs_embeds=None, pixel_values=None, pixel_attention_mask=None,
                     image_hidden_states=None, prompt: bool = True):
        """Token embeddings with image features merged in; returns (embeds, image features).

        ``prompt``: the ids start a sequence (not the next token of a cached generation), so an
        ``<image>`` token among them needs its image; a generated ``<image>`` token gets its
        ordinary embedding, as in transformers."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass pixel_values or image_hidden_states, not both")
        if input_ids is not None:
            input_ids = self._check_ids(input_ids)
            inputs_embeds = self.decoder.embed(input_ids)
        features = image_hidden_states
        if pixel_values is not None:
            features = self.get_image_features(pixel_values, pixel_attention_mask)
        if features is not None:
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, features)
        elif prompt and input_ids is not None and not torch.compiler.is_compiling():
            n = int((input_ids == self.image_token_id).sum())
            if n:
                raise ValueError(f"input_ids hold {n} <image> token(s) (id {self.image_token_id}) but no pixel_values "
                                 "or image_hidden_states were given for them")
        return inputs_embeds, features

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                labels=None, inputs_embeds=None, image_hidden_states=None, position_ids=None, cache=None,
                output_hidden_states: bool = False, logits_to_keep: int = 0, num_items_in_batch=None,
                loss_only: bool = False, **unused) -> VLMOutput:
        """Logits (and the loss when ``labels`` are given), like Idefics3ForConditionalGeneration.

        ``num_items_in_batch``: the loss is the summed loss over this count (transformers' meaning)
        instead of the mean. ``loss_only`` (with ``labels``; what the trainer uses): the LM head runs
        only on the positions that have a label, so the [B, L, V] logits are never made (at a
        49k-word vocabulary they are most of a training step's head work and memory); the output's
        ``logits`` is then None. The loss is the same.
        """
        unknown = set(unused) - {"return_dict", "use_cache"}
        if unknown:
            raise TypeError(f"VLM.forward got unexpected arguments: {', '.join(sorted(unknown))}")
        embeds, features = self.embed_inputs(input_ids, inputs_embeds, pixel_values, pixel_attention_mask,
                                             image_hidden_states, prompt=cache is None or cache.length == 0)
        if labels is not None and labels.shape != embeds.shape[:2]:
            raise ValueError(f"labels must have the shape of input_ids {tuple(embeds.shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
            raise ValueError(f"labels must hold integer token ids (-100 for ignored), got dtype {labels.dtype}")
        if labels is not None and labels.dtype != torch.long:
            labels = labels.long()  # cross_entropy takes int64 targets; the widening is exact
        head = getattr(self.decoder, "head", None) if loss_only and labels is not None else None
        out = self.decoder(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                           cache=cache, logits_to_keep=1 if head is not None else logits_to_keep,
                           output_hidden_states=output_hidden_states)
        if head is not None:
            head_loss = labelled_positions_loss(head, out.last_hidden_state, labels, num_items_in_batch)
            return VLMOutput(logits=None, loss=head_loss, hidden_states=out.hidden_states, image_hidden_states=features)
        loss = None if labels is None else causal_lm_loss(out.logits, labels, num_items_in_batch=num_items_in_batch)
        return VLMOutput(logits=out.logits, loss=loss, hidden_states=out.hidden_states,
                         image_hidden_states=features)

    # ---- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_parts(cls, vision, decoder, connector="pixel_shuffle", *, image_token_id: int | None = None,
                   dtype=None, device=None) -> "VLM":
        """Assemble a variant from a vision encoder, a decoder and a fresh connector.

        ``vision`` / ``decoder``: a checkpoint directory written by transformers (CLIPVisionModel,
        SiglipVisionModel, CLIP/SigLIP dual encoders or Idefics3 for vision; Qwen2/Llama
        ...ForCausalLM or Idefics3 for the decoder; see ``hf.parts``), an already built component
        module (used as is, weights shared), or a component config (fresh random weights).
        ``connector``: a registry name (default config of that connector) or a ConnectorConfig /
        dict; its in_dim/out_dim come from the neighbours (explicit values must match, and the
        error names both sides). Its weights are always fresh.
        ``image_token_id``: an id of the decoder's vocabulary to use for ``<image>``, or None to
        append a new token (id = old vocab_size; embedding and LM-head row = mean of the others;
        a decoder module passed in is grown in place). Add the same token to your tokenizer.
        """
        dtype = resolve_dtype(dtype)
        vision_mod, _ = parts.resolve_part("vision", vision, dtype=dtype, device=device)
        decoder_mod, decoder_dir = parts.resolve_part("decoder", decoder, dtype=dtype, device=device)
        conn_cfg = parts.connector_config(connector)
        if image_token_id is None:
            image_token_id = parts.add_token(decoder_mod)
        # the components' configs are plain attributes (mypy reads them as Tensor | Module); VLMConfig checks them
        vision_cfg: Any = vision_mod.config
        decoder_cfg: Any = decoder_mod.config
        config = VLMConfig(vision=vision_cfg, connector=conn_cfg, decoder=decoder_cfg, image_token_id=image_token_id)
        with torch.device("meta"):
            model = cls(config)
        model.vision = vision_mod
        model.decoder = decoder_mod
        ref = next(decoder_mod.parameters())
        model.connector = registry.create("connector", config.connector.name, config.connector).to(
            dtype=ref.dtype, device=ref.device)
        moves = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
        if moves:
            model.to(**moves)
        if decoder_dir is not None:
            model.generation_config = _read_generation_config(decoder_dir)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, allow_nonfinite: bool = False, *, torch_dtype=None,
                        device_map=None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool | None = None, token=None, quantization: str | None = None,
                        group_size: int | None = None, **unsupported) -> "VLM":
        """Load a Hugging Face Idefics3/SmolVLM checkpoint: a local folder or a Hub id.

        The model is built on the meta device and the checkpoint tensors are assigned
        directly, so no random weights are ever allocated. A weight holding NaN or inf is an
        error naming it unless ``allow_nonfinite``. transformers' arguments: ``dtype`` (a dtype,
        its name, or "auto" for the checkpoint's), ``torch_dtype`` (its older name),
        ``device_map`` ("auto", "cpu", "cuda", "cuda:N": one device, or with "auto" and several
        GPUs the decoder layers spread over them), ``revision``, ``cache_dir``,
        ``local_files_only``, ``token`` (Hub ids, with the hub extra). Others are refused by name.

        ``quantization`` ("int8" / "int4", ``group_size`` for int4) quantizes the decoder's linears and
        LM head while loading: each weight is quantized as it is read, so the float model is never
        whole in memory. A checkpoint saved quantized (config.json ``quantization_config``) loads
        straight into the quantized layout. See docs/quantization.md.
        """
        _refuse_loading_arguments(unsupported)
        path = hub.locate(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                          token=token)
        config = VLMConfig.from_pretrained(path)
        devices = hub.plan_devices(device_map, device)
        with torch.device("meta"):
            model = cls(config)
        load_device = devices[0] if devices and len(devices) == 1 else None
        saved = _read_quantization_config(path)
        plan = saved or (_quantization_plan(model, quantization, group_size) if quantization is not None else None)
        if saved is not None:
            if quantization is not None and _BITS.get(quantization) != saved["bits"]:
                raise ValueError(f"from_pretrained: {path} is saved quantized to {saved['bits']} bits; "
                                 f"quantization={quantization!r} cannot change that (load the float checkpoint)")
            quant.empty_quantized_modules(model, saved["modules"], saved["bits"], saved["group_size"])
        quantized_now: dict = {}
        convert = None
        if plan is not None and saved is None:
            targets = {f"{name}.weight" for name in plan["modules"]}

            def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
                if name not in targets:
                    return tensor
                q, s = quant.quantize_weight(tensor, plan["bits"], plan["group_size"])
                quantized_now[name] = (q, s) if load_device is None else (q.to(load_device), s.to(load_device))
                return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")  # the float weight is dropped
        weights.load_into(model, path, dtype=hub.resolve_load_dtype(dtype, torch_dtype, path), device=load_device,
                          allow_nonfinite=allow_nonfinite, convert=convert)
        if plan is not None and saved is None:
            _swap_in_quantized(model, plan, quantized_now)
        if plan is not None:
            model.quantization_config = plan
        if devices and len(devices) > 1:
            hub.spread(model, devices)
        model.generation_config = _read_generation_config(path)
        model.name_or_path = path
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
        """Write config.json, generation_config.json and safetensors weights (HF layout), atomically:
        the folder holds the whole old checkpoint or the whole new one whatever fails midway; other
        files there (a processor's) stay.

        Works on a wrapped model too (``hf.weights.export_state``): activation-checkpoint wrappers,
        peft LoRA (saved merged), torchao quantized weights (saved dequantized). With distributed
        parameters (FSDP2, tensor parallel) it is a collective: call it on every rank; rank 0 writes.
        """
        state = weights.export_state(self)
        if state is None:
            return  # a rank other than 0 of a distributed model: it took part in the gather
        with files.atomic_directory(os.fspath(path), weights.is_model_file) as tmp:
            self.config.save_pretrained(tmp)
            if getattr(self, "quantization_config", None):
                cfg_file = os.path.join(tmp, "config.json")
                data = files.read_json_object(cfg_file, "config.json")
                files.write_json(cfg_file, {**data, "quantization_config": self.quantization_config}, indent=2,
                                 sort_keys=True)
            weights.save_state(state, tmp, max_shard_bytes=max_shard_bytes)
            gen = dict(self.generation_config) or _default_generation_config(self.config)
            files.write_json(os.path.join(tmp, "generation_config.json"), gen, sort_keys=True)

    # ---- weight-only quantization (ops/quant.py, docs/quantization.md) ----------------------
    def quantize(self, method: str = "int8", group_size: int | None = None, components=("decoder",),
                 lm_head: bool = True) -> "VLM":
        """Quantize the linears of ``components`` ("decoder", "connector", "vision") in place:
        "int8" (per output channel) or "int4" (groups of ``group_size`` = 32/64/128 columns,
        default 64). ``lm_head=False`` keeps the LM head in float. Returns the model."""
        if self.quantization_config:
            raise ValueError("quantize: the model is already quantized "
                             f"({self.quantization_config['bits']} bits); quantize a float model")
        plan = _quantization_plan(self, method, group_size, components, lm_head)
        quant.quantize_modules(self, plan["modules"], plan["bits"], plan["group_size"])
        self.quantization_config = plan
        return self

    # ---- generation (idefics3_kit.generation / idefics3_kit.streaming) --------------------
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                 **kwargs) -> torch.Tensor:
        """Prompt + new tokens [B, L + n] like transformers' generate (left padded).

        transformers' keyword arguments (greedy, sampling and beam search, ``num_return_sequences``,
        ``return_dict_in_generate``, ``stop_strings``, ``logits_processor``/``stopping_criteria``,
        ``generation_config``, ``streamer``, ...; docs/transformers.md lists every one) plus ours:
        ``seed`` / ``generator``, ``sampler`` (a custom SamplerChain), ``strict_context``. Defaults
        come from the checkpoint's generation_config.json. See docs/generation.md.
        """
        return _generate(self, input_ids, attention_mask, pixel_values, pixel_attention_mask, **kwargs)

    def stream(self, processor, input_ids=None, attention_mask=None, pixel_values=None,
               pixel_attention_mask=None, skip_special_tokens: bool = True, **kwargs):
        """Iterator over the generated text of one prompt, piece by piece, never splitting a character.

        ``processor`` is the Processor (or a ``tokenizers.Tokenizer``) used to decode.
        """
        return _stream(self, processor, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                       skip_special_tokens=skip_special_tokens, **kwargs)


# transformers' from_pretrained arguments: accepted at these values only (anything else is refused by name)
_NEUTRAL_LOADING = {"trust_remote_code": (False, None), "low_cpu_mem_usage": (True, False, None),
                    "use_safetensors": (True, None), "attn_implementation": (None, "sdpa", "eager"),
                    "force_download": (False,), "proxies": (None,), "subfolder": ("", None),
                    "output_loading_info": (False,), "ignore_mismatched_sizes": (False,),
                    "quantization_config": (None,), "variant": (None,)}


_BITS = {"int8": 8, "int4": 4}
QUANTIZABLE = ("decoder", "connector", "vision")


def _quantization_plan(model: VLM, method, group_size, components=("decoder",), lm_head: bool = True) -> dict:
    """config.json's ``quantization_config``: method, bits, group size and the quantized modules' names."""
    if method not in _BITS:
        raise ValueError(f"quantization must be 'int8' or 'int4', got {method!r}")
    bits = _BITS[method]
    if bits == 8 and group_size is not None:
        raise ValueError("int8 quantization is per output channel: group_size applies to int4 only")
    group_size = (group_size or 64) if bits == 4 else None
    quant.check_format(bits, group_size)
    components = (components,) if isinstance(components, str) else tuple(components)
    unknown = [c for c in components if c not in QUANTIZABLE]
    if unknown or not components:
        raise ValueError(f"quantize: components must name some of {QUANTIZABLE}, got {components!r}")
    names = [f"{c}.{n}" for c in components for n, m in getattr(model, c).named_modules() if type(m) is nn.Linear]
    if not lm_head:
        names = [n for n in names if n != "decoder.lm_head"]
    for name in names:
        quant.check_format(bits, group_size, cast(nn.Linear, model.get_submodule(name)).in_features, name)
    return {"method": "idefics3_kit", "bits": bits, "group_size": group_size, "modules": names}


def _swap_in_quantized(model: VLM, plan: dict, quantized: dict) -> None:
    """After a quantize-on-load: the linears whose weights were quantized as they were read become
    QuantizedLinear; a weight that came from elsewhere (the tied LM head) is quantized now."""
    for name in plan["modules"]:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if f"{name}.weight" not in quantized:
            quant.quantize_modules(model, [name], plan["bits"], plan["group_size"])
            continue
        q, s = quantized[f"{name}.weight"]
        new = quant.QuantizedLinear(linear.in_features, linear.out_features, plan["bits"], plan["group_size"],
                                    bias=False, dtype=s.dtype, device="meta")
        new.qweight, new.scales = nn.Parameter(q, requires_grad=False), nn.Parameter(s, requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        setattr(parent, attr, new)
    model.tie_weights()


def _read_quantization_config(path: str) -> dict | None:
    """config.json's ``quantization_config`` (ours only; checked), or None."""
    data = files.read_json_object(os.path.join(path, "config.json"), "config.json").get("quantization_config")
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("method") != "idefics3_kit":
        raise ValueError(f"{path}: config.json's quantization_config is not idefics3_kit's "
                         f"(method {data.get('method') if isinstance(data, dict) else data!r}); it cannot be loaded here")
    bits, group, modules = data.get("bits"), data.get("group_size"), data.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{path}: quantization_config.modules must be a list of module names")
    if not isinstance(bits, int):
        raise ValueError(f"{path}: quantization_config.bits must be 8 or 4, got {bits!r}")
    quant.check_format(bits, group if bits == 4 else None)
    return {"method": "idefics3_kit", "bits": bits, "group_size": group if bits == 4 else None, "modules": modules}


def _refuse_loading_arguments(arguments: dict) -> None:
    for key, value in arguments.items():
        if key not in _NEUTRAL_LOADING:
            raise TypeError(f"from_pretrained got an unexpected argument {key!r}")
        if value not in _NEUTRAL_LOADING[key]:
            raise ValueError(f"from_pretrained: {key}={value!r} is not supported (docs/transformers.md)")


def _read_generation_config(path: str) -> dict:
    return files.read_json_if_exists(os.path.join(path, "generation_config.json"), "generation_config.json")


def _default_generation_config(cfg: VLMConfig) -> dict:
    d = cfg.decoder
    return {k: v for k, v in (("bos_token_id", d.bos_token_id), ("eos_token_id", d.eos_token_id),
                              ("pad_token_id", d.pad_token_id)) if v is not None}
