"""Decoders: token ids or embeddings [B, L] -> logits [B, L, V], with an optional KV cache.

``llama3`` is the Llama architecture as transformers implements it (LlamaForCausalLM):
RMSNorm computed in float32, rotary embeddings (rotate-half) with default, linear or
Llama-3.1 frequency scaling, grouped-query attention, SiLU-gated MLP, final norm and an
untied (or tied) LM head. Parameter names match the checkpoint under ``model.text_model.``
(and ``lm_head.``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import DecoderConfig, Qwen2DecoderConfig
from ..registry import register

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, L_kept, V]
    hidden_states: tuple | None = None  # embeddings, then each layer's output (last one normed)
    last_hidden_state: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then scaled by the weight in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with optional linear or llama3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by ``factor``, high ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, L, head_dim] for positions [B, L], computed in float32 then cast."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # [B, L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, hd]; cos/sin [B, L, hd] (or already [B, 1, L, hd])."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=o_bias)

    def forward(self, x, cos, sin, key_padding_mask, cache) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + L, hd]
        # one new token (cached decoding) is the last position: it may see every key, so the
        # causal mask is all true and is skipped (no mask built per layer and step)
        out = ops.attention(q, k, v, causal=length > 1, key_padding_mask=key_padding_mask)
        out = out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)  # [B, L, H*hd]
        return self.o_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, layer_idx, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, cos, sin, key_padding_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _TextModel(nn.Module):
    """Holds embed_tokens / layers / norm so parameter names follow the checkpoint."""

    def __init__(self, cfg: DecoderConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qkv_bias, o_bias) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalDecoder(nn.Module):
    """A Llama-family decoder; subclasses choose the projection biases."""

    config_class = DecoderConfig
    qkv_bias_default: bool | None = None  # None: follow cfg.attention_bias
    o_bias_default: bool | None = None

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        qkv_bias = cfg.attention_bias if self.qkv_bias_default is None else self.qkv_bias_default
        o_bias = cfg.attention_bias if self.o_bias_default is None else self.o_bias_default
        self.model = _TextModel(cfg, qkv_bias, o_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq_cache: dict = {}

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when the config says so (again after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- the decoder contract ---------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def new_cache(self, batch_size: int, max_length: int, dtype=None, device=None):
        """A preallocated KV cache for ``max_length`` tokens per sequence."""
        from ..generation import KVCache

        p = self.model.embed_tokens.weight
        return KVCache(self.config.num_hidden_layers, batch_size, self.config.num_key_value_heads,
                       max_length, self.config.head_dim, dtype or p.dtype, device or p.device)

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq_cache:
            c = self.config
            self._inv_freq_cache[key] = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, device)
        return self._inv_freq_cache[key]

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                cache=None, logits_to_keep: int = 0, output_hidden_states: bool = False) -> DecoderOutput:
        """Run the decoder over ``L`` new tokens.

        attention_mask: [B, past + L] with 1 for real tokens (covers cached tokens too).
        position_ids: [B, L]; default ``past + arange(L)`` like transformers' plain forward.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, length, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)[None].expand(b, length)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, hd]: broadcast over heads, once for all layers
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + length):
                raise ValueError(f"attention_mask must be [B, past + L] = {(b, past + length)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        hidden = [x] if output_hidden_states else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, key_padding_mask, cache)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.advance(length)
        x = self.model.norm(x)
        if hidden is not None:
            hidden[-1] = x
        kept = x[:, -logits_to_keep:] if logits_to_keep else x
        return DecoderOutput(logits=self.lm_head(kept), hidden_states=tuple(hidden) if hidden else None,
                             last_hidden_state=x)


@register("decoder", "llama3")
class Llama3Decoder(CausalDecoder):
    """Llama 3 / SmolLM2 decoder (biases on projections only if ``attention_bias``)."""


@register("decoder", "qwen2")
class Qwen2Decoder(CausalDecoder):
    """Qwen2 / Qwen2.5 decoder (transformers' Qwen2ForCausalLM).

    Llama's layer with Qwen2's fixed biases: q/k/v projections with bias, o_proj and the MLP
    without. RoPE theta, GQA and tied/untied embeddings come from the config.
    Sliding-window attention is refused by ``Qwen2DecoderConfig``.
    """

    config_class = Qwen2DecoderConfig
    qkv_bias_default = True
    o_bias_default = False
