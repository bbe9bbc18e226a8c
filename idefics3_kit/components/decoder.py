"""Decoders: token ids or embeddings [B, L] -> logits [B, L, V], with an optional KV cache.

``llama3`` is the Llama architecture as transformers implements it (LlamaForCausalLM): RMSNorm
computed in float32, rotary embeddings (rotate-half) with default, linear or Llama-3.1 frequency
scaling, grouped-query attention, SiLU-gated MLP, final norm and an untied (or tied) LM head.
``qwen2`` is the same layer with Qwen2's fixed biases. Parameter names match the checkpoint
under ``model.text_model.`` (and ``lm_head.``).

This file is the architecture. Speed lives in ``idefics3_kit.ops``: the projections go through
``ops.linear``/``ops.linears``, attention through ``ops.attention``, and a one-token cached step
may run every layer in one compiled call (``ops.decode_layers``); each steps aside for wrapped,
hooked, quantized or distributed modules and gives the same answer as the code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import DecoderConfig, require
from ..ops import fast_path
from ..ops.decode import LayerWeights
from ..ops.fast_path import plain_module
from ..ops.quant import QuantizedLinear
from ..registry import register

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class Qwen2DecoderConfig(DecoderConfig):
    """Qwen2 / Qwen2.5 decoder (transformers' Qwen2ForCausalLM).

    Defaults are Qwen2.5-0.5B-Instruct's config.json (special-token ids left None, as in
    transformers' Qwen2Config: they come with the checkpoint). The architecture differs from Llama only
    in fixed biases (q/k/v projections with bias, o_proj and MLP without), so
    ``attention_bias``/``mlp_bias`` must stay False. Sliding-window attention is not
    implemented: a config in which some layer would use it (``use_sliding_window`` with
    ``max_window_layers < num_hidden_layers``) is refused.
    """

    name: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None  # the checkpoint says 32768; transformers drops it when sliding is off
    max_window_layers: int = 21

    def __post_init__(self):
        super().__post_init__()
        c = "Qwen2DecoderConfig"
        require(not self.attention_bias, c, "attention_bias",
                "Qwen2 always has q/k/v biases and no o_proj bias; leave attention_bias False")
        require(not self.mlp_bias, c, "mlp_bias", "Qwen2's MLP has no biases; leave mlp_bias False")
        sliding = [i for i in range(self.num_hidden_layers) if i >= self.max_window_layers]
        require(not (self.use_sliding_window and self.sliding_window and sliding), c, "use_sliding_window",
                f"sliding-window attention is not implemented (layers {sliding[:3]}... would use a window of "
                f"{self.sliding_window}); set use_sliding_window=False")


# ---- the KV cache ---------------------------------------------------------------------------------


class KVCache:
    """Per-layer key/value buffers [B, Hkv, max_length, head_dim], preallocated for the whole
    sequence (prompt + new tokens): each layer writes its new keys/values in place.

    A layer's buffers are allocated by its first write, with the batch, head count, head dim,
    dtype and device of the keys that flow, so the cache fits whatever the projections give
    (the local heads of a tensor-parallel shard, an autocast dtype). ``length`` counts the
    tokens already written; the decoder writes L new tokens at ``[length, length + L)`` in every
    layer, then calls ``advance(L)`` once.
    """

    def __init__(self, num_layers: int, max_length: int, dtype: torch.dtype | None = None):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.max_length = max_length
        self.dtype = dtype  # None: the keys' dtype
        self.length = 0
        # CausalDecoder's one-call decode step: the weights it gathered, kept as long as this cache
        # (one generation) and checked at every step (CausalDecoder._step_plan)
        self.step_plan: StepPlan | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, Hkv, L, hd] after the cached tokens; return views of all tokens so far."""
        end = self.check_room(k.shape[2])
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:  # (both are allocated together)
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            keys = self.keys[layer] = torch.zeros(shape, dtype=self.dtype or k.dtype, device=k.device)
            values = self.values[layer] = torch.zeros(shape, dtype=self.dtype or v.dtype, device=v.device)
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def allocate(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Allocate the layers not written yet (for a step that writes them without ``update``)."""
        for i, k in enumerate(self.keys):
            if k is None:
                shape = (batch_size, num_kv_heads, self.max_length, head_dim)
                self.keys[i] = torch.zeros(shape, dtype=self.dtype or dtype, device=device)
                self.values[i] = torch.zeros(shape, dtype=self.dtype or dtype, device=device)

    def check_room(self, n: int) -> int:
        """The length after writing ``n`` more tokens; a clear error when they do not fit."""
        end = self.length + n
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_length {self.max_length}")
        return end

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (e.g. to drop finished sequences or follow beams)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, L_kept, V]
    hidden_states: tuple | None = None  # embeddings, then each layer's output (last one normed)
    last_hidden_state: torch.Tensor | None = None


# ---- rotary position embeddings -------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with optional linear or llama3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
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


STEP_ROPE_POSITIONS = 1 << 14  # decode steps past this compute their rotation (a table would keep megabytes)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, L, head_dim] for positions [B, L], computed in float32 then cast."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # [B, L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding: x * cos + rotate_half(x) * sin. x [B, H, L, hd]; cos/sin
    [B, L, hd] (or already [B, 1, L, hd])."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so that rotate_half(x) * sin == roll(x, hd/2) * signed_sin(sin)
    bit for bit ((-a) * b and a * (-b) round alike)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in the form the layers run (bit-identical, tested): x * cos + roll(x) * signed
    sin, 4 ops instead of 6, with the sign folded into the table once per forward."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


# ---- the layers -----------------------------------------------------------------------------------


@plain_module
class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then scaled by the weight in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


@plain_module
class DecoderAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache.

    Head counts come from the projections' outputs (views with -1), so a tensor-parallel plan
    that shards q/k/v by heads works on the local heads.
    """

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
        """x [B, L, D]; rope = (cos, signed sin), each [B, 1, L, hd]; key_padding_mask [B, past + L] or None."""
        b, length, _ = x.shape
        hd = self.head_dim
        q, k, v = ops.linears(x, (self.q_proj, self.k_proj, self.v_proj))
        cos, sin_signed = rope
        q = apply_rope_rolled(q.view(b, length, -1, hd).transpose(1, 2), cos, sin_signed)  # [B, H, L, hd]
        k = apply_rope_rolled(k.view(b, length, -1, hd).transpose(1, 2), cos, sin_signed)  # [B, Hkv, L, hd]
        v = v.view(b, length, -1, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + L, hd]
        # one new token (cached decoding) is the last position: it may see every key, so the
        # causal mask is all true and is skipped (no mask built per layer and step)
        out = ops.attention(q, k, v, causal=length > 1, key_padding_mask=key_padding_mask)
        out = out.transpose(1, 2).reshape(b, length, -1)  # [B, L, H*hd]
        return ops.linear(self.o_proj, out)


@plain_module
class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ops.gated(self.gate_proj, self.up_proj, x, self.act)  # a bf16 prefill: one fused pass
        if hidden is None:
            gate, up = ops.linears(x, (self.gate_proj, self.up_proj))
            hidden = self.act(gate) * up
        return ops.linear(self.down_proj, hidden)


@plain_module
class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, layer_idx, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x, rope, key_padding_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_padding_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _TextModel(nn.Module):
    """Holds embed_tokens / layers / norm so parameter names follow the checkpoint."""

    def __init__(self, cfg: DecoderConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qkv_bias, o_bias) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---- the decoder ----------------------------------------------------------------------------------


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
        self._step_rope_tables: dict = {}  # (device, dtype) -> (inv_freq, cos, signed sin) [N, 1, hd] (_step_rope)
        self.gradient_checkpointing = False  # recompute each layer in the backward pass (VLM.gradient_checkpointing_enable)

    # ---- weights shared with the embeddings (the one owner of tying) ----------------------
    def tied_weights(self) -> dict[str, str]:
        """Parameter name -> the name it shares storage with (checkpoints store only the latter).
        A quantized LM head (``ops.quant.QuantizedLinear``) holds its own copy: nothing is tied."""
        tied = self.config.tie_word_embeddings and not isinstance(self.lm_head, QuantizedLinear)
        return {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when the config says so (again after loading)."""
        if self.tied_weights():
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Module) -> None:
        # an embedding layer (weight [V, D]) like the one it replaces: tie_weights shares its weight
        self.model.embed_tokens = cast(nn.Embedding, embeddings)
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the vocabulary to ``new_size``; new rows of the embeddings (and of an
        untied LM head) are the mean of the existing ones, which keeps a new token's embedding and
        logit in the range of the others."""
        if not isinstance(new_size, int) or new_size < 1:
            raise ValueError(f"resize_token_embeddings: new_size must be a positive integer, got {new_size!r}")
        old = self.model.embed_tokens
        self.model.embed_tokens = _resized_embedding(old, new_size)
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.hidden_size, new_size, bias=False, device=old.weight.device,
                                     dtype=old.weight.dtype)
        else:
            self.lm_head = _resized_head(self.lm_head, new_size)
        self.config = self.config.replace(vocab_size=new_size)
        self.tie_weights()

    # ---- the decoder contract ---------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: final hidden states [..., D] -> logits [..., V]."""
        return ops.linear(self.lm_head, hidden)

    def new_cache(self, batch_size: int, max_length: int, dtype=None, device=None) -> KVCache:
        """A KV cache for ``max_length`` tokens per sequence (buffers sized by the keys that flow)."""
        return KVCache(len(self.model.layers), max_length, dtype)

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq_cache:
            c = self.config
            self._inv_freq_cache[key] = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, device)
        return self._inv_freq_cache[key]

    def _step_rope(self, position: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [1, 1, 1, hd] of one default position, read from a table of positions
        0..N-1 built by ``rope_cos_sin`` and ``signed_sin`` themselves (N doubles as positions
        grow, up to STEP_ROPE_POSITIONS). Why: a decode step computing them took ~75 µs of ~12 ATen
        ops, most of it on metadata the step's weight stream had evicted; indexing the table is
        two views. The entries are those elementwise ops' results for each position, bit for bit
        (tests/test_properties.py: head dims 8-128, both dtypes)."""
        inv_freq = self.inv_freq(device)
        key = (str(device), dtype)
        table = self._step_rope_tables.get(key)
        if table is None or table[0] is not inv_freq or table[1].shape[0] <= position:
            size = min(STEP_ROPE_POSITIONS, max(256, 1 << position.bit_length()))  # > position
            positions = torch.arange(size, device=device)[:, None]  # [N, 1]
            cos, sin = rope_cos_sin(inv_freq, positions, dtype)  # [N, 1, hd]
            table = self._step_rope_tables[key] = (inv_freq, cos, signed_sin(sin))
        return table[1][position][None, None], table[2][position][None, None]

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                cache=None, logits_to_keep: int = 0, output_hidden_states: bool = False) -> DecoderOutput:
        """Run the decoder over ``L`` new tokens.

        attention_mask: [B, past + L] with 1 for real tokens (covers cached tokens too); None when
        every token is real. position_ids: [B, L]; default ``past + arange(L)`` like transformers'
        plain forward.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, length, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None and cache is not None and length == 1 and past < STEP_ROPE_POSITIONS:
            rope = self._step_rope(past, x.dtype, x.device)  # [1, 1, 1, hd] each: broadcast over the batch
        else:
            if position_ids is None:
                position_ids = torch.arange(past, past + length, device=x.device)[None].expand(b, length)
            cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, x.dtype)
            rope = (cos[:, None], signed_sin(sin)[:, None])  # [B, 1, L, hd]: broadcast over heads, once for all layers
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + length):
                raise ValueError(f"attention_mask must be [B, past + L] = {(b, past + length)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_padding_mask = attention_mask.bool()
        hidden = [x] if output_hidden_states else None
        stepped = None if output_hidden_states else self._one_call_step(x, rope, key_padding_mask, cache)
        normed = False  # whether x went through the final norm already (inside the one-call step)
        logits = None  # the LM head's output, where the one-call step ran the head too
        if stepped is not None:
            x, normed, logits = stepped
        else:
            recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
            for layer in self.model.layers:
                if recompute:
                    x = checkpoint(layer, x, rope, key_padding_mask, None, use_reentrant=False)
                else:
                    x = layer(x, rope, key_padding_mask, cache)
                if hidden is not None:
                    hidden.append(x)
        if cache is not None:
            cache.advance(length)
        if not normed:
            x = self.model.norm(x)
        if hidden is not None:
            hidden[-1] = x
        if logits is None:  # (the step's one token is all of x, whatever logits_to_keep asks)
            logits = self.head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return DecoderOutput(logits=logits, hidden_states=tuple(hidden) if hidden else None, last_hidden_state=x)

    # ---- one compiled call for a whole decode step ------------------------------------------
    def _one_call_step(self, x, rope, key_padding_mask, cache) -> tuple[torch.Tensor, bool, torch.Tensor | None] | None:
        """Every layer of a one-token cached step through ``ops.decode_layers`` (bit-identical to
        the loop over the layers), or None where it does not apply: (the output, whether the final
        norm is applied to it, the logits or None). The op applies the final norm too when it is a
        plain ``RMSNorm`` with the config's eps, which saves a dispatched call whose metadata the
        step has evicted; and then the LM head when ``head`` is this class's and ``lm_head`` a plain
        ``nn.Linear`` or ``ops.quant.QuantizedLinear`` without a bias (``StepPlan.head``), which
        saves its dispatch, its parallel region and the Python of ``ops.linear``."""
        if type(cache) is not KVCache or x.shape[1] != 1:  # a cache subclass may write differently
            return None
        plan = self._step_plan(cache)
        if plan is None:
            return None
        cache.check_room(1)
        cache.allocate(x.shape[0], self.config.num_key_value_heads, self.config.head_dim, x.dtype, x.device)
        # allocate() filled every layer's keys and values
        keys, values = cast("list[torch.Tensor]", cache.keys), cast("list[torch.Tensor]", cache.values)
        # modules the plan's watch vouches for need no second walk: ops.decode_layers then checks
        # only the global hooks for them (what fast_path.plain_modules adds to the per-module walk)
        head, head_scale = plan.head if plan.head is not None else (None, None)
        logits = None if head is None else x.new_empty((x.shape[0], 1, head.shape[0]))
        out = ops.decode_layers(x, plan.weights, keys, values, rope[0], rope[1], key_padding_mask, cache.length,
                                self.config.num_attention_heads, self.config.num_key_value_heads,
                                self.config.rms_norm_eps, () if plan.plain else plan.modules,
                                final_norm=plan.final_norm, head=head, head_scale=head_scale, logits=logits)
        return None if out is None else (out, plan.final_norm is not None, logits)

    def _step_plan(self, cache: KVCache) -> StepPlan | None:
        """The layers' weights for ``ops.decode_layers``, gathered by ``_plain_llama_layers`` at the
        first step of a generation and kept on its cache while nothing they came from changes: a
        snapshot of every module involved (``fast_path.module_state``: each module, its class, its
        parameters and children, its eps, act and layer_idx) must hold the very same objects, and the
        config's eps the same value; anything rebound (a replaced layer or projection, new weights,
        ``quantize``, a LoRA wrapper) gathers them again. A watch of the same modules
        (``fast_path.module_watch``: their classes and dicts' version tags) answers first, in a few
        cache lines per module; the snapshot is compared only when the watch saw a dict change.
        What a snapshot does not see (dtype or layout changed in place, hooks added)
        ``ops.decode_layers`` checks at every call."""
        layers = self.model.layers
        plan = cache.step_plan
        eps = self.config.rms_norm_eps
        if plan is not None and plan.eps == eps:
            if plan.watch is not None and plan.watch[0] is layers and fast_path.unchanged_since(plan.watch[1]):
                return plan  # the usual step: a few cache lines per module
            state = fast_path.module_state((layers, self, *plan.modules), _PLAN_ATTRS, plan.state)
            if state is plan.state:
                plan.watch, plan.plain = self._watch(layers, plan.modules)
                return plan
        found = self._plain_llama_layers()
        if found is None:
            cache.step_plan = None
            return None
        weights, modules, scales, final_norm = found
        head = self._plain_head() if final_norm is not None else None
        if head is not None:
            modules.append(self.lm_head)
        state = fast_path.module_state((layers, self, *modules), _PLAN_ATTRS)
        cache.step_plan = StepPlan(LayerWeights(weights, scales), tuple(modules), state, eps, final_norm,
                                   *self._watch(layers, modules), head=head)
        return cache.step_plan

    def _watch(self, layers, modules) -> tuple[tuple | None, bool]:
        """(the plan's watch: the layer list and ``fast_path.module_watch`` of it, this decoder
        (whose ``lm_head`` and ``model`` a plan reads) and the modules, or None; whether the modules
        were plain (``fast_path.plain_modules``) when it was taken, which holds for them as long as
        the watch does: their classes and hook dicts are in it)."""
        watch = fast_path.module_watch((layers, self, *modules))
        if watch is None:
            return None, False
        return (layers, watch), fast_path.plain_modules(modules)

    def _plain_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, scales or None) of the LM head when a decode step may run it inside
        ``ops.decode_layers``: ``head`` is this class's own, and ``lm_head`` is a plain ``nn.Linear``
        or ``ops.quant.QuantizedLinear`` (no hooks) without a bias; else None (``head`` runs it)."""
        head = self._modules.get("lm_head")
        if head is None or type(self).head is not CausalDecoder.head or not fast_path.plain_modules((head,)):
            return None
        p = head._parameters
        if p.get("bias") is not None:
            return None
        if type(head) is nn.Linear:
            weight = p.get("weight")
            return None if weight is None else (weight, None)
        if type(head) is QuantizedLinear:
            qweight, scales = p.get("qweight"), p.get("scales")
            return None if qweight is None or scales is None else (qweight, scales)
        return None

    def _plain_llama_layers(self):
        """(each layer's weights in ``ops.decode.LAYER_WEIGHTS`` order, every module they come from,
        the scales of quantized weights in the same order or None when none is quantized, the final
        norm's weight when that norm is a plain ``RMSNorm`` with the config's eps (it is then among
        the modules too) or None), or None
        unless every layer is this file's Llama layer with SiLU, no o_proj or MLP biases, the
        config's eps and its own place in the list as layer_idx (``ops.decode_layers`` then checks
        that every module is exactly its plain class, without hooks). Runs at a generation's first
        decode step and again whenever the modules change (``_step_plan``), so modules are read
        from their dicts (nn.Module.__getattr__ costs ~1 ms over 30 layers)."""
        weights, modules, scales = [], [], []
        quantized = False
        eps = self.config.rms_norm_eps
        silu = F.silu
        for index, layer in enumerate(self.model.layers):
            if type(layer) is not DecoderLayer:
                return None
            sub = layer._modules
            attn, mlp, norm1, norm2 = sub["self_attn"], sub["mlp"], sub["input_layernorm"], sub["post_attention_layernorm"]
            a, m = attn._modules, mlp._modules
            q, k, v, o = a.get("q_proj"), a.get("k_proj"), a.get("v_proj"), a.get("o_proj")
            gate, up, down = m.get("gate_proj"), m.get("up_proj"), m.get("down_proj")
            # (layer_idx: the cache slot the Python layer writes; the op writes slot `index`)
            if (getattr(mlp, "act", None) is not silu or getattr(norm1, "eps", None) != eps
                    or getattr(norm2, "eps", None) != eps or getattr(attn, "layer_idx", None) != index):
                return None
            try:
                qp, kp, vp, op = q._parameters, k._parameters, v._parameters, o._parameters
                gp, up_, dp = gate._parameters, up._parameters, down._parameters
                if op["bias"] is not None or gp["bias"] is not None or up_["bias"] is not None or dp["bias"] is not None:
                    return None
                # the two uniform layers inline (this runs for every linear of every layer at every
                # decode step): all nn.Linear, or all quantized (ops.quant); a mix goes linear by linear
                if ("weight" in qp and "weight" in kp and "weight" in vp and "weight" in op and "weight" in gp
                        and "weight" in up_ and "weight" in dp):
                    linears = (qp["weight"], kp["weight"], vp["weight"], op["weight"], gp["weight"], up_["weight"],
                               dp["weight"])
                    layer_scales = _NO_SCALES
                elif ("qweight" in qp and "qweight" in kp and "qweight" in vp and "qweight" in op and "qweight" in gp
                        and "qweight" in up_ and "qweight" in dp):
                    linears = (qp["qweight"], kp["qweight"], vp["qweight"], op["qweight"], gp["qweight"],
                               up_["qweight"], dp["qweight"])
                    layer_scales = (qp["scales"], kp["scales"], vp["scales"], op["scales"], gp["scales"],
                                    up_["scales"], dp["scales"])
                else:
                    pairs = [_weight_and_scales(p) for p in (q, k, v, o, gate, up, down)]
                    linears, layer_scales = tuple(w for w, _ in pairs), tuple(s for _, s in pairs)
                qw, kw, vw, ow, gw, uw, dw = linears
                qs, ks, vs, os_, gs, us, ds = layer_scales
                weights.append((norm1._parameters["weight"], qw, kw, vw, qp["bias"], kp["bias"], vp["bias"], ow,
                                norm2._parameters["weight"], gw, uw, dw))
                scales.append((None, qs, ks, vs, None, None, None, os_, None, gs, us, ds))
                quantized = quantized or layer_scales is not _NO_SCALES
            except (AttributeError, KeyError):  # a replaced part without these parameters: not a plain layer
                return None
            modules += (layer, attn, mlp, norm1, norm2, q, k, v, o, gate, up, down)
        norm = self.model._modules.get("norm")  # the final norm: the op applies it when it is a plain RMSNorm
        final_norm = None
        if type(norm) is RMSNorm and norm.__dict__.get("eps") == eps:
            final_norm = norm._parameters.get("weight")
            modules.append(norm)
        return weights, modules, scales if quantized else None, final_norm


_NO_SCALES = (None,) * 7  # the scales of a layer of plain nn.Linear projections
_PLAN_ATTRS = ("eps", "act", "layer_idx")  # the instance attributes _plain_llama_layers reads


@dataclass
class StepPlan:
    """What ``CausalDecoder._step_plan`` gathered for a generation's one-call decode steps."""

    weights: LayerWeights
    modules: tuple  # every module whose forward the step replaces (12 per layer)
    state: tuple  # fast_path.module_state of (the layer list, the decoder, *modules) when gathered
    eps: float  # the config's rms_norm_eps when gathered
    final_norm: torch.Tensor | None  # the final norm's weight when the op applies it (a plain RMSNorm)
    watch: tuple | None = None  # (the layer list, fast_path.module_watch of it, the decoder and the modules, or None)
    plain: bool = False  # the modules were plain (fast_path.plain_modules) when the watch was taken
    head: tuple | None = None  # (weight, scales or None) of the LM head when the op runs it (its module is the last of modules)


def _weight_and_scales(linear: nn.Module):
    """(weight, None) of an nn.Linear; (qweight, scales) of a quantized one (``ops.quant``)."""
    p = linear._parameters
    return (p["weight"], None) if "weight" in p else (p["qweight"], p["scales"])


def _resized_embedding(old: nn.Embedding, new_size: int) -> nn.Embedding:
    w = old.weight.detach()
    new = nn.Embedding(new_size, w.shape[1], device=w.device, dtype=w.dtype)
    keep = min(new_size, w.shape[0])
    with torch.no_grad():
        new.weight[:keep] = w[:keep]
        new.weight[keep:] = w.float().mean(0).to(w.dtype)
    return new


def _resized_head(old: nn.Linear, new_size: int) -> nn.Linear:
    w = old.weight.detach()
    new = nn.Linear(w.shape[1], new_size, bias=old.bias is not None, device=w.device, dtype=w.dtype)
    keep = min(new_size, w.shape[0])
    with torch.no_grad():
        new.weight[:keep] = w[:keep]
        new.weight[keep:] = w.float().mean(0).to(w.dtype)
        if old.bias is not None:
            new.bias[:keep] = old.bias[:keep]
            new.bias[keep:] = old.bias.float().mean().to(old.bias.dtype)
    new.train(old.training)
    return new


@register("decoder", "llama3", hf={"model_types": ("llama",)})
class Llama3Decoder(CausalDecoder):
    """Llama 3 / SmolLM2 decoder (biases on projections only if ``attention_bias``)."""


@register("decoder", "qwen2", hf={"model_types": ("qwen2",)})
class Qwen2Decoder(CausalDecoder):
    """Qwen2 / Qwen2.5 decoder (transformers' Qwen2ForCausalLM).

    Llama's layer with Qwen2's fixed biases: q/k/v projections with bias, o_proj and the MLP
    without. RoPE theta, GQA and tied/untied embeddings come from the config.
    Sliding-window attention is refused by ``Qwen2DecoderConfig``.
    """

    config_class = Qwen2DecoderConfig
    qkv_bias_default = True
    o_bias_default = False
