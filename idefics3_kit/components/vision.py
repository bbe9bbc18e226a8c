"""Vision encoders: pixel tiles [N, 3, S, S] + patch mask [N, S/p, S/p] -> hidden [N, (S/p)², D].

``siglip`` follows transformers' Idefics3VisionTransformer (SigLIP with NaViT-style
variable-resolution position ids): conv patch embedding, pre-LN blocks with tanh-GELU MLPs,
a final post-LayerNorm, no pooling head. Parameter names match the Hugging Face checkpoint
under ``model.vision_model.``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dataclasses import dataclass

from .. import ops
from ..config import VisionConfig, require
from ..registry import register

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def patch_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position-embedding ids [N, h*w] for tiles whose valid patches are ``patch_mask`` [N, h, w].

    Reproduces transformers' float32 bucketize procedure: the valid patches of a tile are
    spread over the full ``patches_per_side`` grid of learned positions (fraction i/nb bucketed
    against boundaries k/N), so a partially filled tile still sees positions from the whole
    grid; masked patches get id 0. A full tile gives the identity 0..N²-1.
    """
    n, h, w = patch_mask.shape
    device = patch_mask.device
    grid = patches_per_side
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=device)  # float32, length N-1 (or N)
    nb_h = patch_mask[:, :, 0].sum(dim=1)  # [N] valid rows (counted in column 0)
    nb_w = patch_mask[:, 0, :].sum(dim=1)  # [N] valid columns (counted in row 0)
    frac_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * (1.0 / nb_h)[:, None]
    frac_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * (1.0 / nb_w)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, h]
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # [N, w]
    pos = (bucket_h[:, :, None] * grid + bucket_w[:, None, :]).reshape(n, h * w)
    return torch.where(patch_mask.reshape(n, h * w), pos, torch.zeros_like(pos))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patches_per_side = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        # [N, h*w, D], patches row-major, contiguous: a transposed view's strides would pass
        # through every residual add of the tower, each LayerNorm would copy its input, and each
        # add would run strided (13% of a bf16 tower on CPU)
        x = ops.patch_embed(self.patch_embedding, pixel_values)
        pos = patch_position_ids(patch_mask, self.patches_per_side)
        return x + self.position_embedding(pos)


class SiglipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        n, length, _ = x.shape

        def heads(t):  # [N, L, D] -> [N, H, L, hd] (H from the projection: local heads under TP)
            return t.view(n, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = (ops.dense(proj, x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = ops.attention(heads(q), heads(k), heads(v), causal=False, key_padding_mask=key_mask)
        out = out.transpose(1, 2).reshape(n, length, -1)  # [N, L, D]
        return ops.dense(self.out_proj, out)


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        if act not in ACTIVATIONS:
            raise ValueError(f"VisionConfig.hidden_act: unsupported activation {act!r} (one of {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_name in ops.dense_activations:  # the activation runs in fc1's matmul epilogue
            return ops.dense(self.fc2, ops.dense(self.fc1, x, self.act_name))
        return ops.dense(self.fc2, self.act(ops.dense(self.fc1, x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # recompute each layer in the backward pass

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, num_layers: int | None = None) -> torch.Tensor:
        """The first ``num_layers`` layers (all by default) over x [N, L, D]."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers[:num_layers]:
            x = checkpoint(layer, x, key_mask, use_reentrant=False) if recompute else layer(x, key_mask)
        return x


@register("vision", "siglip", hf={"model_types": ("idefics3_vision", "siglip_vision_model"),
                                  "dual_encoder": "siglip"})
class SiglipVisionEncoder(nn.Module):
    """SigLIP ViT with variable-resolution position ids (Idefics3's vision tower)."""

    config_class = VisionConfig

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.hidden_size = cfg.hidden_size
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, C, H, W], patch_mask [N, H/p, W/p] bool -> hidden [N, (H/p)(W/p), D].

        ``patch_mask`` None means every patch is real (the same result as an all-true mask,
        through faster attention); the caller knows, so nothing here branches on values.
        """
        n, _, height, width = pixel_values.shape
        key_mask = None if patch_mask is None else patch_mask.reshape(n, -1)
        if patch_mask is None:
            patch_mask = torch.ones(n, height // self.patch_size, width // self.patch_size,
                                    dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        return self.post_layernorm(self.encoder(x, key_mask))


# --------------------------------------------------------------------------------------
# CLIP


@dataclass(frozen=True)
class ClipVisionConfig(VisionConfig):
    """CLIP ViT vision tower (transformers' CLIPVisionModel); defaults: openai/clip-vit-base-patch16.

    ``feature_layer`` picks the hidden state handed to the connector, indexed like transformers'
    ``hidden_states`` tuple (0: embeddings after pre_layrnorm, k: output of layer k): -1 is
    ``last_hidden_state`` (the default), -2 the penultimate layer that LLaVA uses. The class
    token is always dropped, so the connector sees the square patch grid. ``post_layernorm``
    (applied by transformers only to the pooled class token) is kept for checkpoints but not
    used for the features. ``projection_dim`` is carried for config.json round trips only.
    ``interpolate_pos_encoding``: tiles of another size than ``image_size`` get bicubically
    resized position embeddings, as transformers does when called with
    ``interpolate_pos_encoding=True``; False refuses them.
    """

    name: str = "clip"
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    feature_layer: int = -1
    interpolate_pos_encoding: bool = True

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        require(isinstance(self.feature_layer, int) and -(n + 1) <= self.feature_layer <= n,
                "ClipVisionConfig", "feature_layer",
                f"must index the {n + 1} hidden states (-{n + 1}..{n}), got {self.feature_layer!r}")

    @property
    def num_layers_run(self) -> int:
        """How many encoder layers produce the selected hidden state."""
        return self.feature_layer % (self.num_hidden_layers + 1)


class ClipEmbeddings(nn.Module):
    """Class token + bias-free conv patches + learned absolute positions for N²+1 slots."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.grid = cfg.patches_per_side
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings [1+h*w, D]; for another grid than the trained one, the patch part is
        resized bicubically (transformers' ``interpolate_pos_encoding``), the class slot kept."""
        table = self.position_embedding.weight  # [1+N², D]
        if (h, w) == (self.grid, self.grid):
            return table
        d = table.shape[1]
        patch = table[1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)  # [1, D, N, N]
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(h * w, d)], dim=0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        p = self.patch_embedding.stride[0]
        h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = ops.patch_embed(self.patch_embedding, pixel_values)  # [N, P, D], patches row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, D]
        return torch.cat([cls, x], dim=1) + self.positions(h, w)  # [N, 1+P, D]


@register("vision", "clip", hf={"model_types": ("clip_vision_model",), "dual_encoder": "clip"})
class ClipVisionEncoder(nn.Module):
    """CLIP ViT (transformers' CLIPVisionModel) under the vision contract.

    pixel_values [N, C, H, W] + patch_mask [N, H/p, W/p] -> [N, (H/p)(W/p), D]. Tiles of
    ``image_size`` use the trained absolute positions; other sizes resize them bicubically as
    transformers' ``interpolate_pos_encoding=True`` does (``interpolate_pos_encoding=False`` in
    the config refuses them instead). There is no NaViT-style variable resolution. The class token
    takes part in attention but is dropped from the output, so the connector sees the square
    patch grid. Masked patches are excluded as attention keys (the class token never is);
    their own rows are still computed. A full tile matches transformers exactly; a partially
    masked tile has no transformers counterpart (CLIP never saw padding), so prefer full tiles.
    The output is hidden state ``feature_layer`` (default: last_hidden_state, i.e. without
    post_layernorm, which transformers applies only to the pooled class token).
    """

    config_class = ClipVisionConfig

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.hidden_size = cfg.hidden_size
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic) transformers' name
        self.encoder = SiglipEncoder(cfg)  # same pre-LN block and parameter names
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, _, height, width = pixel_values.shape
        self._check_size(height, width)
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [N, 1+P, D]
        key_mask = None
        if patch_mask is not None:
            flat = patch_mask.reshape(n, -1).bool()
            if flat.shape[1] != x.shape[1] - 1:
                raise ValueError(f"clip vision encoder: patch_mask has {flat.shape[1]} patches per tile, "
                                 f"expected {x.shape[1] - 1}")
            key_mask = torch.cat([flat.new_ones(n, 1), flat], dim=1)  # class token always attendable
        return self.encoder(x, key_mask, self.config.num_layers_run)[:, 1:]

    def _check_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if not self.config.interpolate_pos_encoding and (height // p, width // p) != (self.embeddings.grid,) * 2:
            raise ValueError(f"clip vision encoder: tiles must be {self.image_size}x{self.image_size} pixels "
                             f"(interpolate_pos_encoding is off), got {height}x{width}")

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' pooler_output: post_layernorm of the final class token, [N, D]."""
        self._check_size(*pixel_values.shape[2:])
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), None)
        return self.post_layernorm(x[:, 0])
