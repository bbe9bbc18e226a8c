"""Decoders: token ids or embeddings [B, L] -> logits [B, L, V], with an optional KV cache.

``llama3`` is the Llama architecture as transformers implements it (LlamaForCausalLM):
RMSNorm computed in float32, rotary embeddings (rotate-half) with default, linear or
Llama-3.1 frequency scaling, grouped-query attention, SiLU-gated MLP, final norm and an
untied (or tied) LM head. Parameter names match the checkpoint under ``model.text_model.``
(and ``lm_head.``).
"""

from __future__ import annotations

import math
import weakref
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
        return ops.rms_norm(x, self.weight, self.eps)  # one compiled pass per row for CPU inference


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


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == roll(x, hd/2) * signed_sin(sin),
    bit for bit ((-a) * b and a * (-b) round alike), in 2 ops instead of 4 per call."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` (bit-identical) with ``signed_sin``; any layout whose last dim is hd."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


# ---- prepacked bf16 weights for decoding on CPU -------------------------------------------------
# torch's bf16 F.linear on CPU goes through oneDNN and re-lays-out the weight on every call,
# which dominates a one-token decode step. Weights packed once into oneDNN's layout give
# bit-identical results for up to PACKED_MAX_ROWS rows (checked for every decoder shape and
# 1..32 rows; tests/test_generation.py checks the logits) at a fraction of the time. The plain
# weights stay (prefill, training, saving); the packed copy costs the weights' memory once more.

PACKED_MAX_ROWS = 32
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()  # kept off the modules:
# deepcopy/pickle of a model never sees the opaque oneDNN tensors


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack(layer: nn.Linear) -> bool:
    """Attach a oneDNN-packed copy of ``layer.weight`` for small-batch inference; False if not applicable."""
    w = layer.weight
    if not can_prepack(w):
        _PACKED.pop(layer, None)
        return False
    with torch.no_grad():
        _PACKED[layer] = (w, _weight_key(w), torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
    return True


def unpack(module: nn.Module) -> None:
    """Drop the packed and fused copies under ``module`` (frees their memory)."""
    for m in module.modules():
        _PACKED.pop(m, None)
        _FUSED.pop(m, None)


# Fused projections (q|k|v and gate|up) for the same small-batch inference steps: one packed
# bf16 matmul instead of three (two). Outputs are bit-identical to the separate projections
# (checked for 1..32 rows; also for fp32 MKL, where fusing was measured not to pay and is off).
_FUSED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fuse(owner: nn.Module, layers: tuple) -> bool:
    """Keep a concatenated, oneDNN-packed bf16 weight of ``layers`` for ``owner`` (CPU bf16 only)."""
    ws = [layer.weight for layer in layers]
    if any(layer.bias is not None for layer in layers) or len({(w.dtype, w.device) for w in ws}) != 1:
        return False
    if not can_prepack(ws[0]):  # measured: fp32 fusion alone gains nothing (bandwidth-bound) but costs memory
        return False
    with torch.no_grad():
        w = torch.ops.mkldnn._reorder_linear_weight(torch.cat([x.detach() for x in ws]), 1)
    _FUSED[owner] = (tuple(ws), tuple(_weight_key(x) for x in ws), w, [x.shape[0] for x in ws])
    return True


def _fused_fresh(owner: nn.Module, layers: tuple):
    f = _FUSED.get(owner)
    if f is None:
        return None
    for layer, w, key in zip(layers, f[0], f[1]):
        if layer.weight is not w or _weight_key(w) != key:
            return None
    return f


def fused_linear(owner: nn.Module, layers: tuple, x: torch.Tensor, split: bool = True):
    """The outputs of ``layers`` on ``x`` from one fused matmul (concatenated on the last dim
    when ``split`` is False), or None when not applicable."""
    if not _plain_linear(*layers):
        return None
    y = ops.decode_linear(x, [layer.weight for layer in layers], [layer.bias for layer in layers])
    if y is not None:  # compiled few-row kernel: reads the separate weights in one call
        return y.split([layer.weight.shape[0] for layer in layers], dim=-1) if split else y
    if x.dtype != torch.bfloat16 or x.numel() > PACKED_MAX_ROWS * x.shape[-1] or torch.is_grad_enabled():
        return None
    f = _fused_fresh(owner, layers)
    if f is None:
        return None
    y = torch.ops.mkldnn._linear_pointwise(x, f[2], None, "none", [], "")
    return y.split(f[3], dim=-1) if split else y


def _plain(*modules: nn.Module) -> bool:
    """True when running these modules' math directly (compiled kernels, packed weights) is the
    same as calling them: no subclass overriding ``forward`` for the projections (LoRA-style
    wrappers), and no forward hooks on the modules or installed globally."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def _plain_linear(*layers: nn.Module) -> bool:
    return all(type(layer) is nn.Linear for layer in layers) and _plain(*layers)


def _weight_key(w: torch.Tensor) -> tuple:
    """Changes when the weight is modified in place or its data swapped (``module.to(...)``)."""
    return w._version, w.data_ptr(), w.dtype


def _fresh(layer: nn.Linear) -> bool:
    packed = _PACKED.get(layer)
    return packed is not None and packed[0] is layer.weight and packed[1] == _weight_key(layer.weight)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through the compiled few-row kernel or the packed weight when there is a
    fresh one and few rows, without autograd."""
    if not _plain_linear(layer):
        return layer(x)
    y = ops.decode_linear(x, [layer.weight], [layer.bias])
    if y is not None:
        return y
    if (x.dtype == torch.bfloat16 and x.numel() <= PACKED_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and _fresh(layer)):
        return torch.ops.mkldnn._linear_pointwise(x, _PACKED[layer][2], layer.bias, "none", [], "")
    return layer(x)


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

    def forward(self, x, rope, key_padding_mask, cache) -> torch.Tensor:
        """x [B, L, D]; rope = (cos, sin, sin_signed), each [B, L, 1, hd]."""
        b, length, _ = x.shape
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin, sin_signed = rope
        projs = (self.q_proj, self.k_proj, self.v_proj)
        qkv = fused_linear(self, projs, x, split=False)  # [B, L, (H + 2 Hkv) hd] or None
        if qkv is not None:
            # decode fast path: q and k rotated together (one rope for both, fewer ops per step)
            qk = apply_rope_rolled(qkv[..., :(h + hkv) * hd].view(b, length, h + hkv, hd), cos, sin_signed)
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)  # [B, H(kv), L, hd]
            v = qkv[..., (h + hkv) * hd:].view(b, length, hkv, hd).transpose(1, 2)
        else:
            q, k, v = [linear(p, x) for p in projs]
            cos_t, sin_t = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, 1, L, hd]
            q = apply_rope(q.view(b, length, h, hd).transpose(1, 2), cos_t, sin_t)  # [B, H, L, hd]
            k = apply_rope(k.view(b, length, hkv, hd).transpose(1, 2), cos_t, sin_t)  # [B, Hkv, L, hd]
            v = v.view(b, length, hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + L, hd]
        # one new token (cached decoding) is the last position: it may see every key, so the
        # causal mask is all true and is skipped (no mask built per layer and step)
        out = ops.attention(q, k, v, causal=length > 1, key_padding_mask=key_padding_mask)
        out = out.transpose(1, 2).reshape(b, length, h * hd)  # [B, L, H*hd]
        return linear(self.o_proj, out)


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projs = (self.gate_proj, self.up_proj)
        gate, up = fused_linear(self, projs, x) or [linear(p, x) for p in projs]
        return linear(self.down_proj, self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, layer_idx, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, rope, key_padding_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_padding_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _decode_layer_params(decoder: "CausalDecoder", x: torch.Tensor, cache) -> list | None:
    """The flat parameter list ``decode_layers`` takes (12 per layer), or None when the step is
    not one it covers: one token per row on CPU, float32 (any batch) or bfloat16 with the
    few-row linear kernel, inference, the compiled backend, plain Llama layers (SiLU, no o_proj
    or MLP biases, one eps, no subclassed parts, no forward hooks), contiguous CPU parameters, a
    KVCache, and a head dim the decode kernel takes."""
    from ..generation import KVCache
    from ..ops import attention_compiled, linear as linear_ops, _library

    if (x.shape[1] != 1 or type(cache) is not KVCache or x.device.type != "cpu" or torch.is_grad_enabled()
            or not _library.use_compiled() or not hasattr(torch.ops.idefics3_kit, "decode_layers")):
        return None
    if x.dtype == torch.bfloat16:
        if not linear_ops.covers(x.shape[0] * x.shape[1], x.dtype):
            return None
    elif x.dtype != torch.float32:
        return None
    hd = decoder.config.head_dim
    if hd % 8 or not 8 <= hd <= 512 or not attention_compiled._fast_cpu() or decoder.config.hidden_act != "silu":
        return None
    return _layer_params(decoder, x.dtype)


_PARAM_ORDER = (("input_layernorm", "weight"), ("self_attn.q_proj", "weight"), ("self_attn.k_proj", "weight"),
                ("self_attn.v_proj", "weight"), ("self_attn.q_proj", "bias"), ("self_attn.k_proj", "bias"),
                ("self_attn.v_proj", "bias"), ("self_attn.o_proj", "weight"), ("post_attention_layernorm", "weight"),
                ("mlp.gate_proj", "weight"), ("mlp.up_proj", "weight"), ("mlp.down_proj", "weight"))


def _layer_params(decoder: "CausalDecoder", dtype: torch.dtype) -> list | None:
    """The 12 tensors per layer for decode_layers, or None when a layer is not a plain Llama
    layer. Runs every decode step, so modules and parameters are read from their dicts
    (nn.Module.__getattr__ costs ~1 ms over 30 layers)."""
    if not _plain():  # global forward hooks
        return None
    params = []
    eps = None
    for layer in decoder.model.layers:
        mods = {"": layer}
        for path in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            mods[path] = layer._modules[path]
        a, m = mods["self_attn"]._modules, mods["mlp"]._modules
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mods["self_attn." + name] = a[name]
        for name in ("gate_proj", "up_proj", "down_proj"):
            mods["mlp." + name] = m[name]
        if (type(layer) is not DecoderLayer or type(mods["self_attn"]) is not DecoderAttention
                or type(mods["mlp"]) is not GatedMLP or type(mods["input_layernorm"]) is not RMSNorm
                or type(mods["post_attention_layernorm"]) is not RMSNorm or mods["mlp"].__dict__["act"] is not F.silu):
            return None
        for path, mod in mods.items():
            if mod._forward_hooks or mod._forward_pre_hooks or ("_proj" in path and type(mod) is not nn.Linear):
                return None
        for path in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if mods[path]._parameters["bias"] is not None:
                return None
        layer_eps = {mods["input_layernorm"].eps, mods["post_attention_layernorm"].eps}
        if len(layer_eps) != 1 or (eps is not None and layer_eps != {eps}):
            return None  # the op takes one eps
        eps = layer_eps.pop()
        for path, name in _PARAM_ORDER:
            p = mods[path]._parameters[name]
            if p is not None and (p.dtype != dtype or not p.is_cpu or not p.is_contiguous()):
                return None
            params.append(p)
    return params


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

    def prepack_for_decode(self) -> bool:
        """Prepare weights for small-batch inference steps (<= PACKED_MAX_ROWS rows, no autograd):
        fused q|k|v and gate|up projections, and on CPU in bf16 oneDNN-packed weights (see
        ``prepack``). Bit-identical outputs; costs extra weight memory (``unpack`` frees it).
        Idempotent: fresh copies are kept, stale ones rebuilt. Returns True if anything applies."""
        done = False
        fused_layers = set()
        for module in self.modules():
            if isinstance(module, DecoderAttention):
                projs = (module.q_proj, module.k_proj, module.v_proj)
            elif isinstance(module, GatedMLP):
                projs = (module.gate_proj, module.up_proj)
            else:
                continue
            if _fused_fresh(module, projs) is not None or fuse(module, projs):
                fused_layers.update(projs)
                done = True
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in fused_layers:
                done = (_fresh(module) or prepack(module)) or done
        return done

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq_cache:
            c = self.config
            self._inv_freq_cache[key] = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, device)
        return self._inv_freq_cache[key]

    def _decode_layers(self, x, rope, key_padding_mask, cache) -> torch.Tensor | None:
        """All layers of a one-token cached step in one compiled call (``decode_layers``), or
        None where it does not apply (the Python layers then run; results are bit-identical)."""
        params = _decode_layer_params(self, x, cache)
        if params is None:
            return None
        cache.check_room(1)
        cos, _, sin_signed = rope
        if cos.shape[0] != x.shape[0]:  # position_ids [1, 1] shared by the batch: the layers broadcast it
            cos, sin_signed = cos.expand(x.shape[0], -1, -1, -1), sin_signed.expand(x.shape[0], -1, -1, -1)
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
        layer0 = self.model.layers[0]
        return torch.ops.idefics3_kit.decode_layers(
            x, params, cache.keys, cache.values, cos, sin_signed, mask, cache.length,
            layer0.self_attn.num_heads, layer0.self_attn.num_kv_heads, layer0.input_layernorm.eps)

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
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, L, 1, hd]: broadcast over heads, once for all layers
        rope = (cos, sin, signed_sin(sin))
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + length):
                raise ValueError(f"attention_mask must be [B, past + L] = {(b, past + length)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        hidden = [x] if output_hidden_states else None
        fused = None if output_hidden_states else self._decode_layers(x, rope, key_padding_mask, cache)
        if fused is not None:
            x = fused
        else:
            for layer in self.model.layers:
                x = layer(x, rope, key_padding_mask, cache)
                if hidden is not None:
                    hidden.append(x)
        if cache is not None:
            cache.advance(length)
        x = self.model.norm(x)
        if hidden is not None:
            hidden[-1] = x
        kept = x[:, -logits_to_keep:] if logits_to_keep else x
        return DecoderOutput(logits=linear(self.lm_head, kept), hidden_states=tuple(hidden) if hidden else None,
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
