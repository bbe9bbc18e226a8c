// decode_layers on CPU: every decoder layer of a one-token decode step in one call.
//
// The same ATen ops and kernels, in the same order and on the same layouts, as the Python layers
// run for this step (components/decoder.py: RMSNorm, q|k|v projection, rotary embedding, cache
// write, decode attention, o_proj, residual, RMSNorm, gate|up, SiLU gate, down, residual), so the
// result is bit-identical to them; what goes away is the Python between the ~40 ops of each
// layer, which at SmolVLM-256M shapes is a third of a bf16 decode step. The rotation is written as
// x * cos + roll(x, hd/2) * signed_sin, elementwise the same products as rotate_half(x) * sin
// ((-a) * b and a * (-b) round alike), for q and k together.
//
// bf16 steps write every intermediate into buffers allocated once per step and reused by each
// layer (layers_bf16): with GEMVs taken out, an int4 step at SmolVLM-256M shapes spent ~0.83 ms
// outside them with a fresh tensor (and fresh activation buffers) per op, ~0.68 ms with these.
// The bf16 step runs in one OpenMP region (step_team.h): the calling thread runs the layers, and
// each GEMV and attention call hands its pieces to the region's other threads.
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include <idefics3_kit/bf16.h>
#include <idefics3_kit/rms_norm.h>
#include <idefics3_kit/rope.h>

#include "common.h"
#include "kernels.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kParamsPerLayer = 12;
// Slots of one layer in the params list (None where a projection has no bias).
enum Param : int64_t { kInNorm, kQ, kK, kV, kQBias, kKBias, kVBias, kO, kPostNorm, kGate, kUp, kDown };

const char* const kSlotNames[kParamsPerLayer] = {"input norm", "q_proj", "k_proj", "v_proj", "q bias", "k bias",
                                                  "v bias", "o_proj", "post-attention norm", "gate_proj", "up_proj",
                                                  "down_proj"};

// The op's tensor lists read once into a table of pointers (null for None): a step looks each
// parameter up several times, and c10::List::get copies the tensor (a refcount round trip) each time.
class Table {
 public:
  explicit Table(const c10::List<std::optional<at::Tensor>>& list) : owned_(list.vec()) {
    ptrs_.reserve(owned_.size());
    for (const auto& t : owned_) ptrs_.push_back(t.has_value() && t->defined() ? &*t : nullptr);
  }
  // the tensor at i, or null (None, undefined, or past the end)
  const at::Tensor* get(int64_t i) const { return i < size() ? ptrs_[i] : nullptr; }
  int64_t size() const { return static_cast<int64_t>(ptrs_.size()); }

 private:
  std::vector<std::optional<at::Tensor>> owned_;
  std::vector<const at::Tensor*> ptrs_;
};

const at::Tensor& need(const Table& params, int64_t layer, Param slot) {
  const at::Tensor* t = params.get(layer * kParamsPerLayer + slot);
  TORCH_CHECK(t != nullptr, "decode_layers: params[", layer * kParamsPerLayer + slot, "] (layer ", layer, " ",
              kSlotNames[slot], ") must be a tensor, got None");
  return *t;
}

// float32: x [B, 1, K] through the given weights, outputs side by side on the last dim (q|k|v, or
// one projection): at::linear per weight (what nn.Linear runs), joined by an exact copy.
at::Tensor project_f32(const at::Tensor& x, at::TensorList weights, c10::ArrayRef<const at::Tensor*> biases) {
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < weights.size(); ++i)
    outs.push_back(at::linear(x, weights[i], biases[i] ? std::optional<at::Tensor>(*biases[i]) : std::nullopt));
  return outs.size() == 1 ? outs[0] : at::cat(outs, -1);
}

// float32 RMSNorm as ops.rms_norm runs it: torch's own (which keeps float32 logits equal to
// transformers').
at::Tensor norm_f32(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return weight * at::rms_norm(x, {x.size(-1)}, std::nullopt, eps);
}

uint16_t* bf16_bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Whether any of the n bf16 values is an infinity or a NaN (exponent bits all set).
bool any_non_finite(const uint16_t* v, int64_t n) {
  uint16_t hit = 0;
  for (int64_t i = 0; i < n; ++i) hit |= static_cast<uint16_t>((v[i] & 0x7F80u) == 0x7F80u);
  return hit != 0;
}

// bf16: x + delta rounded to bf16 (what ATen's bf16 add computes: the fp32 sum of the two values,
// rounded once) into sum, and that sum's RMSNorm (rms_norm_cpu's row kernel) into normed (null:
// none), in one pass per row, without the ATen add's dispatch and allocation. Bit-identical to
// `x + delta` followed by rms_norm_cpu. All [B, 1, D] and contiguous; sum may be x itself.
// Where an input holds an infinity or a NaN the sum may be a NaN, whose bits depend on the path
// that rounded it (ATen's vector code writes 0xffff, its scalar tail 0x7fc0; this loop keeps the
// NaN's own bits): then ATen's add itself runs, as the Python layer does. Finite inputs never sum
// to a NaN.
void add_norm_bf16(const at::Tensor& x, const at::Tensor& delta, const at::Tensor* weight, double eps, at::Tensor& sum,
                   at::Tensor* normed) {
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  const uint16_t *xp = bf16_bits(x), *dp = bf16_bits(delta);
  uint16_t* sp = bf16_bits(sum);
  const bool aten_add = any_non_finite(xp, rows * d) || any_non_finite(dp, rows * d);
  if (aten_add) at::add_out(sum, x, delta);
  for (int64_t r = 0; r < rows; ++r) {
    if (!aten_add)
      for (int64_t c = 0; c < d; ++c)
        sp[r * d + c] = float_to_bf16_rne(bf16_bits_to_float(xp[r * d + c]) + bf16_bits_to_float(dp[r * d + c]));
    if (normed) norm::row(sp + r * d, bf16_bits(*weight), d, static_cast<float>(eps), bf16_bits(*normed) + r * d);
  }
}

// float32: silu(gate(x)) * up(x), each projection a separate, contiguous F.linear output as the
// Python layers make it (the bf16 path runs SiLU on split views of one gate|up output instead:
// SiLU's vectorized and scalar exp differ in the last bit, so the layout must match the layers').
at::Tensor gated_f32(const at::Tensor& x, const at::Tensor& gate_w, const at::Tensor& up_w) {
  return at::silu(at::linear(x, gate_w)) * at::linear(x, up_w);
}

// bf16: the rotation of q and k (rope.h: the same roundings as the ATen ops the Python layers run,
// so bit-identical to qk * cos + roll(qk, hd/2) * sin_signed) and the cache writes of k and v, in
// one pass over the q|k|v row of each sequence, with ten fewer ATen calls a layer. q [B, H, 1, hd]
// is written; qkv, cos and sin_signed ([B, 1, 1, hd]) are contiguous.
void rotate_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin_signed,
                      const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t past, int64_t heads,
                      int64_t kv_heads, int64_t hd, at::Tensor& q) {
  const int64_t b = qkv.size(0), width = qkv.size(-1);
  const auto* xp = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  const auto* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr<at::BFloat16>());
  const auto* sp = reinterpret_cast<const uint16_t*>(sin_signed.data_ptr<at::BFloat16>());
  auto* qp = reinterpret_cast<uint16_t*>(q.data_ptr<at::BFloat16>());
  auto* kc = reinterpret_cast<uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  auto* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const int64_t lmax = k_cache.size(2);
  for (int64_t i = 0; i < b; ++i) {
    const uint16_t* row = xp + i * width;
    const uint16_t* c = cp + i * hd;
    const uint16_t* sn = sp + i * hd;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      uint16_t* out = h < heads ? qp + (i * heads + h) * hd : kc + ((i * kv_heads + h - heads) * lmax + past) * hd;
      rope::rotate_row(row + h * hd, c, sn, hd, out);
    }
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(vc + ((i * kv_heads + h) * lmax + past) * hd, row + (heads + kv_heads + h) * hd, hd * 2);
  }
}

// Every parameter of every layer against the layer's dimensions: the ATen ops of the float32 path
// would broadcast a wrong-shaped norm or down_proj weight instead of failing.
void check_params(const Table& params, const Table& scales, int64_t layers, const at::Tensor& x, int64_t heads,
                  int64_t kv_heads, int64_t hd) {
  const int64_t hidden = x.size(2), q_rows = heads * hd, kv_rows = kv_heads * hd;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t base = l * kParamsPerLayer;
    // The intermediate size is gate_proj's row count (up_proj and down_proj are checked against it).
    const at::Tensor* gate = params.get(base + kGate);
    const int64_t gate_cols = scales.get(base + kGate) && gate && gate->scalar_type() == at::kByte ? 2 : 1;  // packed int4
    TORCH_CHECK(!gate || (gate->dim() == 2 && gate->size(1) * gate_cols == hidden), "decode_layers: params[", base + kGate,
                "] (layer ", l, " gate_proj) must be [intermediate, hidden = ", hidden, "], got ", shape_str(*gate));
    const int64_t inter = gate ? gate->size(0) : 0;
    // each slot's expected shape: want[slot][0 .. dims[slot])
    int64_t want[kParamsPerLayer][2] = {
        {hidden, 0}, {q_rows, hidden}, {kv_rows, hidden}, {kv_rows, hidden}, {q_rows, 0}, {kv_rows, 0}, {kv_rows, 0},
        {hidden, q_rows}, {hidden, 0}, {inter, hidden}, {inter, hidden}, {hidden, inter}};
    constexpr int64_t dims[kParamsPerLayer] = {1, 2, 2, 2, 1, 1, 1, 2, 1, 2, 2, 2};
    for (int64_t slot = 0; slot < kParamsPerLayer; ++slot) {
      const at::Tensor* t = params.get(base + slot);
      const bool optional = slot == kQBias || slot == kKBias || slot == kVBias;
      if (t == nullptr) {
        TORCH_CHECK(optional, "decode_layers: params[", base + slot, "] (layer ", l, " ", kSlotNames[slot],
                    ") must be a tensor, got None");
        continue;
      }
      const bool quantized = scales.get(base + slot) != nullptr;
      if (quantized) {  // ops.quant's layout: int8 [N, K] or packed int4 uint8 [N, K/2]; scales checked by quant_linear
        TORCH_CHECK(x.scalar_type() == at::kBFloat16 && (t->scalar_type() == at::kChar || t->scalar_type() == at::kByte),
                    "decode_layers: params[", base + slot, "] (layer ", l, " ", kSlotNames[slot], ") has scales, so it "
                    "must be an int8 or packed-int4 uint8 weight with bfloat16 x, got ", t->scalar_type(), " with ",
                    x.scalar_type(), " x");
        if (t->scalar_type() == at::kByte) want[slot][1] /= 2;
      } else {
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), "decode_layers: params[", base + slot,
                    "] (layer ", l, " ", kSlotNames[slot], ") must be a CPU ", x.scalar_type(), " tensor, got ",
                    t->scalar_type(), " on ", t->device());
      }
      const at::IntArrayRef expected(want[slot], dims[slot]);
      TORCH_CHECK(t->sizes() == expected, "decode_layers: params[", base + slot, "] (layer ", l,
                  " ", kSlotNames[slot], ") must be ", expected, " (hidden ", hidden, ", num_heads ",
                  heads, ", num_kv_heads ", kv_heads, ", head_dim ", hd, ", intermediate ", inter, "), got ",
                  shape_str(*t));
      TORCH_CHECK(t->is_contiguous(), "decode_layers: params[", base + slot, "] (layer ", l, " ", kSlotNames[slot],
                  ") must be contiguous, got strides ", c10::str(t->strides()));
    }
  }
}

void check_args(const at::Tensor& x, int64_t layers, const at::TensorList k_cache, const at::TensorList v_cache,
                const at::Tensor& cos, const at::Tensor& sin_signed, const std::optional<at::Tensor>& key_mask,
                int64_t past, int64_t heads, int64_t kv_heads, double eps) {
  const char* op = "decode_layers";
  check_cpu(x, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, op, ": x must be [B, 1, D] (one new token per sequence), got ",
              shape_str(x));
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == layers && static_cast<int64_t>(v_cache.size()) == layers, op,
              ": k_cache and v_cache must hold one tensor per layer (", layers, " layers from params), got ",
              k_cache.size(), " and ", v_cache.size());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, op, ": num_heads (", heads,
              ") must be a positive multiple of num_kv_heads (", kv_heads, ")");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  for (int64_t l = 0; l < layers; ++l) {
    for (const at::Tensor* c : {&k_cache[l], &v_cache[l]}) {
      TORCH_CHECK(c->dim() == 4 && c->size(0) == x.size(0) && c->size(1) == kv_heads, op, ": cache of layer ", l,
                  " must be [B, Hkv, Lmax, hd] with B = ", x.size(0), ", Hkv = ", kv_heads, ", got ", shape_str(*c));
      TORCH_CHECK(c->scalar_type() == x.scalar_type() && c->device().is_cpu(), op, ": cache of layer ", l,
                  " must be a CPU ", x.scalar_type(), " tensor, got ", c->scalar_type(), " on ", c->device());
      TORCH_CHECK(c->size(3) == k_cache[0].size(3), op, ": cache of layer ", l, " must have head dim ",
                  k_cache[0].size(3), " (layer 0's), got shape ", shape_str(*c));
      TORCH_CHECK(c->is_contiguous(), op, ": cache of layer ", l, " must be contiguous, got strides ",
                  c10::str(c->strides()));
      TORCH_CHECK(past >= 0 && past < c->size(2), op, ": past (", past, ") must be in [0, Lmax = ", c->size(2),
                  "): the new token is written at position past");
    }
  }
  const int64_t hd = k_cache[0].size(3);
  TORCH_CHECK(hd >= 8 && hd % 8 == 0 && hd <= 512, op, ": head dim (the caches' last dim) must be a multiple of 8 "
              "in [8, 512], got ", hd);
  check_cpu(cos, op, "cos");
  check_cpu(sin_signed, op, "sin_signed");
  for (const at::Tensor* r : {&cos, &sin_signed})
    TORCH_CHECK(r->dim() == 4 && r->size(0) == x.size(0) && r->size(1) == 1 && r->size(2) == 1 && r->size(3) == hd &&
                    r->scalar_type() == x.scalar_type(),
                op, ": cos and sin_signed must be [B, 1, 1, hd] = [", x.size(0), ", 1, 1, ", hd, "] in x's dtype, got ",
                shape_str(*r), " ", r->scalar_type());
  if (key_mask) {
    check_cpu(*key_mask, op, "key_mask");
    check_dtype(*key_mask, at::kBool, op, "key_mask");
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == x.size(0) && key_mask->size(1) == past + 1, op,
                ": key_mask must be [B, past + 1] = [", x.size(0), ", ", past + 1, "], got ", shape_str(*key_mask));
  }
}

// The projection groups of a layer, as the bf16 step runs them (one linear call each).
enum Group : int64_t { kQkv, kOut, kGateUp, kDownGroup, kGroups };
constexpr Param kGroupSlots[kGroups][3] = {{kQ, kK, kV}, {kO, kO, kO}, {kGate, kUp, kUp}, {kDown, kDown, kDown}};
constexpr int64_t kGroupSize[kGroups] = {3, 1, 2, 1};
constexpr int64_t kQuantPerLayer = 7;                                  // q k v o gate up down
constexpr int64_t kGroupFirst[kGroups] = {0, 3, 4, 6};                 // a group's first in those 7

// A step's quantized weights: every one checked before the first layer (check_quant_weight reads
// metadata only), their data pointers taken as each layer starts (gather), a layer after
// prefetch_layer asked for them. Taken all up front, the 210 pointers of SmolVLM-256M cost ~50 us
// of an int4 step (timed inside the op, Zen 4), ~15 us when timed again right after: each
// StorageImpl, which holds a data pointer, is a dependent cache miss once the previous step has
// streamed the weights through. Gathered a layer at a time behind the prefetch, ~25 us.
// Per layer, each group is all quantized or not at all (else an error).
class QuantPlan {
 public:
  QuantPlan() = default;
  QuantPlan(const Table& params, const Table& scales, int64_t layers, int64_t hidden, int64_t q_rows)
      : params_(&params), scales_(&scales), hidden_(hidden), q_rows_(q_rows) {
    if (scales.size() == 0) return;
    weights_.resize(static_cast<size_t>(layers * kQuantPerLayer));
    bits_.assign(static_cast<size_t>(layers * kQuantPerLayer), 0);
    biases_.resize(static_cast<size_t>(layers * kQuantPerLayer));
    quantized_.assign(static_cast<size_t>(layers * kGroups), 0);
    for (int64_t l = 0; l < layers; ++l) check_layer(l);
  }

  bool quantized(int64_t l, Group g) const { return any_ && quantized_[l * kGroups + g]; }
  // The group's weights (kGroupSize[g] of them), gathered.
  const QuantWeight* group(int64_t l, Group g) const { return weights_.data() + l * kQuantPerLayer + kGroupFirst[g]; }

  // Layer l's data pointers (its metadata was prefetched during the layer before).
  void gather(int64_t l) {
    if (!any_) return;
    const int64_t base = l * kParamsPerLayer;
    for (int64_t g = 0; g < kGroups; ++g) {
      if (!quantized_[l * kGroups + g]) continue;
      for (int64_t i = 0; i < kGroupSize[g]; ++i) {
        const Param slot = kGroupSlots[g][i];
        const int64_t at = l * kQuantPerLayer + kGroupFirst[g] + i;
        const at::Tensor& bias = biases_[at];
        weights_[at] = quant_weight_unchecked(need(*params_, l, slot), *scales_->get(base + slot),
                                              width(l, static_cast<Group>(g)), bits_[at],
                                              bias.defined() ? bias.const_data_ptr<float>() : nullptr);
      }
    }
  }

 private:
  int64_t width(int64_t l, Group g) const {  // the group's input width K
    return g == kOut ? q_rows_ : g == kDownGroup ? need(*params_, l, kGate).size(0) : hidden_;
  }

  void check_layer(int64_t l) {
    const int64_t base = l * kParamsPerLayer;
    for (int64_t g = 0; g < kGroups; ++g) {
      int64_t found = 0;
      for (int64_t i = 0; i < kGroupSize[g]; ++i) found += scales_->get(base + kGroupSlots[g][i]) != nullptr;
      TORCH_CHECK(found == 0 || found == kGroupSize[g], "decode_layers: layer ", l, ": the weights of one "
                  "projection group (q|k|v, gate|up) must be all quantized or none");
      if (found == 0) continue;
      quantized_[l * kGroups + g] = 1;
      any_ = true;
      for (int64_t i = 0; i < kGroupSize[g]; ++i) {
        const Param slot = kGroupSlots[g][i];
        const int64_t at = l * kQuantPerLayer + kGroupFirst[g] + i;
        const at::Tensor& w = need(*params_, l, slot);
        bits_[at] = check_quant_weight(w, *scales_->get(base + slot), width(l, static_cast<Group>(g)),
                                       static_cast<size_t>(i), "decode_layers");
        if (g == kQkv)  // float32 copies of the q/k/v biases, which the weights point to
          biases_[at] =
              bias_as_float(params_->get(base + kQBias + i), static_cast<size_t>(i), w.size(0), "decode_layers");
      }
    }
  }

  const Table* params_ = nullptr;
  const Table* scales_ = nullptr;
  int64_t hidden_ = 0, q_rows_ = 0;
  std::vector<QuantWeight> weights_;  // [layers * kQuantPerLayer] (unset where a group is not quantized)
  std::vector<int> bits_;             // the same places: 8 or 4
  std::vector<at::Tensor> biases_;    // the same places: float32 q/k/v biases (undefined: none)
  std::vector<char> quantized_;       // [layers * kGroups]
  bool any_ = false;
};

// The LM head a step may end with: logits [B, 1, V] = the final norm's output through the head
// weight [V, D], written into the caller's tensor, as ops.linear(lm_head, normed) computes them
// (decode_linear's kernel for a bf16 weight, quant_linear's for a quantized one, at::linear in
// float32), so the logits are bit-identical to that call's. Why in the op: after the layers the
// head is one more GEMV over the step's largest weight (a fifth of the bytes at SmolVLM-256M
// shapes); run as a piece of the step's team it needs no parallel region, dispatch or Python of
// its own.
struct LmHead {
  const at::Tensor* weight;  // [V, D] in x's dtype, or ops.quant's int8 [V, D] / packed int4 [V, D / 2]
  const at::Tensor* scale;   // the quantized weight's bf16 scales (null: not quantized)
  at::Tensor logits;         // [B, 1, V], contiguous, x's dtype: written by the step
};

LmHead check_head(const at::Tensor& x, const std::optional<at::Tensor>& final_norm, const std::optional<at::Tensor>& head,
                  const std::optional<at::Tensor>& head_scale, const std::optional<at::Tensor>& logits) {
  const char* op = "decode_layers";
  TORCH_CHECK(head.has_value() || !head_scale.has_value(), op, ": head_scale given without a head");
  TORCH_CHECK(head.has_value() == logits.has_value(), op, ": head and logits come together (the op writes the "
              "head's output into logits), got ", head ? "a head without logits" : "logits without a head");
  TORCH_CHECK(final_norm.has_value(), op, ": a head needs final_norm (the head reads the final norm's output)");
  TORCH_CHECK(!head_scale || x.scalar_type() == at::kBFloat16, op, ": a quantized head (head_scale given) needs "
              "bfloat16 x, got ", x.scalar_type());
  check_cpu(*head, op, "head");
  check_cpu(*logits, op, "logits");
  check_dim(*head, 2, op, "head");
  const int64_t vocab = head->size(0), hidden = x.size(2);
  if (head_scale) {
    check_cpu(*head_scale, op, "head_scale");
    check_quant_weight(*head, *head_scale, hidden, 0, op);
  } else {
    check_dtype(*head, x.scalar_type(), op, "head");
    check_contiguous(*head, op, "head");
    TORCH_CHECK(head->size(1) == hidden, op, ": head must be [V, D] with D = ", hidden, " (x's last dim), got ",
                shape_str(*head));
  }
  TORCH_CHECK(logits->dim() == 3 && logits->size(0) == x.size(0) && logits->size(1) == 1 && logits->size(2) == vocab,
              op, ": logits must be [B, 1, V] = [", x.size(0), ", 1, ", vocab, "] (V: the head's rows), got ",
              shape_str(*logits));
  check_dtype(*logits, x.scalar_type(), op, "logits");
  check_contiguous(*logits, op, "logits");
  return LmHead{&*head, head_scale ? &*head_scale : nullptr, *logits};
}

// What every layer of a step shares: the arguments after their checks.
struct Step {
  const Table& params;
  const Table& scales;
  QuantPlan* quant;  // the bf16 step's quantized weights (null for float32)
  const at::Tensor* final_norm;  // the final RMSNorm's weight [D] (null: the op returns the residual stream)
  const LmHead* head;            // the LM head the step ends with (null: none)
  at::TensorList k_cache, v_cache;
  std::optional<at::Tensor> mask;
  int64_t layers, past, heads, kv_heads, hd;
  double eps, scale;
};

// Asks for the StorageImpl of t (which holds its data pointer), where the layer's step reads it.
void prefetch_storage(const at::Tensor* t) {
  if (t == nullptr || !t->has_storage()) return;
  const auto* impl = reinterpret_cast<const char*>(t->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  __builtin_prefetch(impl);
  __builtin_prefetch(impl + 64);
}

// What layer l reads through data pointers (its weights, scales and norms, its caches), asked for
// a layer ahead: the previous step streamed every weight through the caches, so each of these
// reads would otherwise be a dependent miss (bf16 or quantized steps alike).
void prefetch_layer(const Step& s, int64_t l) {
  for (int64_t slot = 0; slot < kParamsPerLayer; ++slot) {
    prefetch_storage(s.params.get(l * kParamsPerLayer + slot));
    prefetch_storage(s.scales.get(l * kParamsPerLayer + slot));
  }
  prefetch_storage(&s.k_cache[l]);
  prefetch_storage(&s.v_cache[l]);
}

// Decode attention of layer l over the cache's first past + 1 positions: [B, H, 1, hd].
at::Tensor attend(const at::Tensor& q, const Step& s, int64_t l) {
  return decode_attention_cpu(q, s.k_cache[l].narrow(2, 0, s.past + 1), s.v_cache[l].narrow(2, 0, s.past + 1), s.mask,
                              std::nullopt, s.scale);
}

// attend's arithmetic on raw pointers (check_args checked the caches, the mask and the heads):
// the contiguous queries q [B, H, 1, hd] against layer l's cache -> out [B, 1, H, hd] (contiguous),
// without the views, the output tensor and the argument checks of the op per layer.
void attend_into(const at::Tensor& q, const Step& s, int64_t l, at::Tensor& out) {
  DecodeAttention a;
  a.b = q.size(0);
  a.hq = s.heads;
  a.hkv = s.kv_heads;
  a.l = s.past + 1;
  a.d = s.hd;
  a.bf16 = q.scalar_type() == at::kBFloat16;
  a.q = q.data_ptr();
  a.q_s0 = s.heads * s.hd;
  a.q_s1 = s.hd;
  a.set_kv(s.k_cache[l], s.v_cache[l]);
  a.key_mask = s.mask ? reinterpret_cast<const uint8_t*>(s.mask->data_ptr<bool>()) : nullptr;
  a.mask_s0 = s.past + 1;
  a.seqlens = nullptr;
  a.out = out.data_ptr();
  a.o_s0 = s.heads * s.hd;
  a.o_s1 = s.hd;
  a.scale = s.scale;
  decode_attention_run(a);
}

// bf16: x [B, 1, K] (contiguous) through layer l's projection group g into y [B, 1, sum of N], the
// outputs side by side: one decode_linear, as the Python layers make it, or, where the step's plan
// holds the group quantized (ops.quant.QuantizedLinear's layout), one quant_linear_run.
void project(const Step& s, int64_t l, Group g, const at::Tensor& x, c10::ArrayRef<const at::Tensor*> biases,
             at::Tensor& y) {
  const int64_t k = x.size(-1);
  if (s.quant != nullptr && s.quant->quantized(l, g)) {
    quant_linear_run(bf16_bits(x), x.numel() / k, k, c10::ArrayRef<QuantWeight>(s.quant->group(l, g), kGroupSize[g]),
                     bf16_bits(y));
    return;
  }
  c10::SmallVector<at::Tensor, 3> weights;
  for (int64_t i = 0; i < kGroupSize[g]; ++i) weights.push_back(need(s.params, l, kGroupSlots[g][i]));
  decode_linear_into(x, weights, biases, y);
}

// Layer l's q|k|v biases (null where a projection has none), in projection order.
std::array<const at::Tensor*, 3> qkv_biases(const Step& s, int64_t l) {
  const int64_t base = l * kParamsPerLayer;
  return {s.params.get(base + kQBias), s.params.get(base + kKBias), s.params.get(base + kVBias)};
}

// bf16: a step's activations, allocated once and reused by every layer (the projections, norms,
// rotation and SiLU write into them), so a layer allocates only inside attention. The gate|up
// buffers are sized for layer 0; a layer of another MLP width gets its own (mlp_bf16).
struct Buffers {
  at::Tensor x;     // [B, 1, D] the residual stream, updated in place
  at::Tensor h;     // [B, 1, D] the current RMSNorm output (input of q|k|v or gate|up)
  at::Tensor o, down;                // [B, 1, D] o_proj and down_proj outputs
  at::Tensor qkv;                    // [B, 1, (H + 2 Hkv) hd]
  at::Tensor q;                      // [B, H, 1, hd] rotated queries
  at::Tensor attn;                   // [B, 1, H * hd] attention output, the o_proj's input
  at::Tensor gu, act;                // [B, 1, 2 I] gate|up, [B, 1, I] silu(gate) * up
  at::Tensor gate_part, up_part;     // views of gu
  int64_t inter;                     // I
};

Buffers step_buffers(const at::Tensor& x_in, const Step& s) {
  const int64_t b = x_in.size(0), hidden = x_in.size(2), inter = need(s.params, 0, kGate).size(0);
  const auto opts = x_in.options();
  Buffers buf;
  buf.x = at::empty({b, 1, hidden}, opts);
  buf.h = at::empty({b, 1, hidden}, opts);
  buf.o = at::empty({b, 1, hidden}, opts);
  buf.down = at::empty({b, 1, hidden}, opts);
  buf.qkv = at::empty({b, 1, (s.heads + 2 * s.kv_heads) * s.hd}, opts);
  buf.q = at::empty({b, s.heads, 1, s.hd}, opts);
  buf.attn = at::empty({b, 1, s.heads * s.hd}, opts);
  buf.gu = at::empty({b, 1, 2 * inter}, opts);
  buf.act = at::empty({b, 1, inter}, opts);
  buf.gate_part = buf.gu.narrow(-1, 0, inter);
  buf.up_part = buf.gu.narrow(-1, inter, inter);
  buf.inter = inter;
  return buf;
}

// Layer l's attention block on buf.h (its input norm): q|k|v, rotation and cache writes, decode
// attention, o_proj; then x_prev + o into buf.x and its post-attention norm into buf.h.
void attention_bf16(Buffers& buf, const Step& s, int64_t l, const at::Tensor& x_prev, const at::Tensor& cos,
                    const at::Tensor& sin_signed) {
  const at::Tensor* no_bias[1] = {nullptr};
  project(s, l, kQkv, buf.h, qkv_biases(s, l), buf.qkv);
  rotate_and_cache(buf.qkv, cos, sin_signed, s.k_cache[l], s.v_cache[l], s.past, s.heads, s.kv_heads, s.hd, buf.q);
  attend_into(buf.q, s, l, buf.attn);
  project(s, l, kOut, buf.attn, no_bias, buf.o);
  add_norm_bf16(x_prev, buf.o, &need(s.params, l, kPostNorm), s.eps, buf.x, &buf.h);
}

// Layer l's MLP block on buf.h: silu(gate) * up on split views of one gate|up output, as the
// Python layers run it, then down_proj; buf.x + down into buf.x and the next layer's input norm
// into buf.h (after the last layer: the final norm, when the step has one).
void mlp_bf16(Buffers& buf, const Step& s, int64_t l) {
  const at::Tensor* no_bias[1] = {nullptr};
  const at::Tensor* no_biases[2] = {nullptr, nullptr};
  const int64_t inter = need(s.params, l, kGate).size(0);
  const bool shared = inter == buf.inter;
  at::Tensor gu = shared ? buf.gu : at::empty({buf.x.size(0), 1, 2 * inter}, buf.x.options());
  project(s, l, kGateUp, buf.h, no_biases, gu);
  at::Tensor act = shared ? buf.act : at::empty({buf.x.size(0), 1, inter}, buf.x.options());
  const uint16_t* gate_up = bf16_bits(gu);
  if (!silu_mul_rows_as_aten(gate_up, gate_up + inter, 2 * inter, bf16_bits(act), gu.size(0), inter)) {
    at::silu_out(act, shared ? buf.gate_part : gu.narrow(-1, 0, inter));
    at::mul_out(act, act, shared ? buf.up_part : gu.narrow(-1, inter, inter));
  }
  project(s, l, kDownGroup, act, no_bias, buf.down);
  const bool last = l + 1 == s.layers;
  const at::Tensor* next_norm = last ? s.final_norm : &need(s.params, l + 1, kInNorm);
  add_norm_bf16(buf.x, buf.down, next_norm, s.eps, buf.x, next_norm ? &buf.h : nullptr);
}

// bf16: the step's LM head on h (the final norm's output [B, 1, D]) into head.logits.
void head_bf16(const LmHead& head, const at::Tensor& h) {
  const at::Tensor* no_bias[1] = {nullptr};
  at::Tensor logits = head.logits;
  if (head.scale != nullptr)
    quant_linear_into(h, *head.weight, *head.scale, no_bias, logits);
  else
    decode_linear_into(h, *head.weight, no_bias, logits);
}

at::Tensor layers_bf16(const at::Tensor& x_in, const Step& s, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  Buffers buf = step_buffers(x_in, s);
  const at::Tensor cos = cos_in.contiguous(), sin_signed = sin_in.contiguous();  // [B, 1, 1, hd]
  const at::Tensor x_c = x_in.contiguous();
  const int64_t hidden = x_c.size(2);
  for (int64_t r = 0; r < x_c.size(0); ++r)  // layer 0's input norm (later ones come with the previous layer's MLP)
    norm::row(bf16_bits(x_c) + r * hidden, bf16_bits(need(s.params, 0, kInNorm)), hidden, static_cast<float>(s.eps),
              bf16_bits(buf.h) + r * hidden);
  prefetch_layer(s, 0);
  auto layers = [&] {
    for (int64_t l = 0; l < s.layers; ++l) {
      if (l + 1 < s.layers) prefetch_layer(s, l + 1);
      if (s.quant != nullptr) s.quant->gather(l);
      attention_bf16(buf, s, l, l == 0 ? x_c : buf.x, cos, sin_signed);
      mlp_bf16(buf, s, l);
    }
    if (s.head != nullptr) head_bf16(*s.head, buf.h);
  };
  // one OpenMP region for the whole step: its GEMVs and attention hand their pieces to the
  // region's threads (step_team.h) instead of opening ~150 regions of their own
  StepTeam::lead(at::get_num_threads(), layers);
  return s.final_norm ? buf.h : buf.x;
}

// float32: the ATen ops themselves, as the Python layers run them (their fp32 rounding, no
// contraction questions).
at::Tensor layers_f32(const at::Tensor& x_in, const Step& s, const at::Tensor& cos, const at::Tensor& sin_signed) {
  const int64_t b = x_in.size(0), inter_rows = s.heads + s.kv_heads;
  at::Tensor x = x_in;
  for (int64_t l = 0; l < s.layers; ++l) {
    const at::Tensor h = norm_f32(x, need(s.params, l, kInNorm), s.eps);
    const at::Tensor qkv =
        project_f32(h, {need(s.params, l, kQ), need(s.params, l, kK), need(s.params, l, kV)}, qkv_biases(s, l));
    const at::Tensor qk_in = qkv.narrow(-1, 0, inter_rows * s.hd).view({b, 1, inter_rows, s.hd});
    const at::Tensor qk = qk_in * cos + at::roll(qk_in, {s.hd / 2}, {-1}) * sin_signed;  // [B, 1, H + Hkv, hd]
    const at::Tensor q = qk.narrow(2, 0, s.heads).transpose(1, 2);                       // [B, H, 1, hd]
    const at::Tensor k = qk.narrow(2, s.heads, s.kv_heads).transpose(1, 2);              // [B, Hkv, 1, hd]
    const at::Tensor v =  // [B, Hkv, 1, hd]
        qkv.narrow(-1, inter_rows * s.hd, s.kv_heads * s.hd).view({b, 1, s.kv_heads, s.hd}).transpose(1, 2);
    s.k_cache[l].narrow(2, s.past, 1).copy_(k);
    s.v_cache[l].narrow(2, s.past, 1).copy_(v);
    const at::Tensor attn = attend(q, s, l);
    const at::Tensor* no_bias[1] = {nullptr};
    x = x + project_f32(attn.transpose(1, 2).reshape({b, 1, s.heads * s.hd}), {need(s.params, l, kO)}, no_bias);
    const at::Tensor h2 = norm_f32(x, need(s.params, l, kPostNorm), s.eps);
    const at::Tensor act = gated_f32(h2, need(s.params, l, kGate), need(s.params, l, kUp));
    x = x + project_f32(act, {need(s.params, l, kDown)}, no_bias);
  }
  if (!s.final_norm) return x;
  const at::Tensor normed = norm_f32(x, *s.final_norm, s.eps);
  if (s.head != nullptr) {
    at::Tensor logits = s.head->logits;
    logits.copy_(at::linear(normed, *s.head->weight));  // what nn.Linear runs; the copy is exact
  }
  return normed;
}

}  // namespace

at::Tensor decode_layers_cpu(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& params_list,
                             at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& cos,
                             const at::Tensor& sin_signed, const std::optional<at::Tensor>& key_mask, int64_t past,
                             int64_t heads, int64_t kv_heads, double eps,
                             const c10::List<std::optional<at::Tensor>>& scales_list,
                             const std::optional<at::Tensor>& final_norm, const std::optional<at::Tensor>& head,
                             const std::optional<at::Tensor>& head_scale, const std::optional<at::Tensor>& logits) {
  TORCH_CHECK(params_list.size() % kParamsPerLayer == 0 && params_list.size() > 0, "decode_layers: params must hold ",
              kParamsPerLayer, " entries per layer, got ", params_list.size());
  const int64_t layers = static_cast<int64_t>(params_list.size()) / kParamsPerLayer;
  check_args(x_in, layers, k_cache, v_cache, cos, sin_signed, key_mask, past, heads, kv_heads, eps);
  const int64_t hd = k_cache[0].size(3);
  TORCH_CHECK(scales_list.size() == 0 || scales_list.size() == params_list.size(), "decode_layers: scales must be empty "
              "or hold one entry per params entry (", params_list.size(), "), got ", scales_list.size());
  const Table params(params_list), scales(scales_list);
  check_params(params, scales, layers, x_in, heads, kv_heads, hd);
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  QuantPlan quant = bf16 ? QuantPlan(params, scales, layers, x_in.size(2), heads * hd) : QuantPlan{};
  if (final_norm) {
    check_cpu(*final_norm, "decode_layers", "final_norm");
    TORCH_CHECK(final_norm->dim() == 1 && final_norm->size(0) == x_in.size(2) &&
                    final_norm->scalar_type() == x_in.scalar_type() && final_norm->is_contiguous(),
                "decode_layers: final_norm must be a contiguous [D] = [", x_in.size(2), "] tensor in x's dtype ",
                x_in.scalar_type(), ", got ", final_norm->scalar_type(), " ", shape_str(*final_norm));
  }
  const std::optional<LmHead> lm_head =
      head || logits || head_scale ? std::optional<LmHead>(check_head(x_in, final_norm, head, head_scale, logits))
                                   : std::nullopt;
  const Step step{params, scales, &quant, final_norm ? &*final_norm : nullptr, lm_head ? &*lm_head : nullptr,
                  k_cache, v_cache,
                  key_mask ? std::optional<at::Tensor>(key_mask->contiguous()) : std::nullopt,
                  layers, past, heads, kv_heads, hd, eps, 1.0 / std::sqrt(static_cast<double>(hd))};
  return bf16 ? layers_bf16(x_in, step, cos, sin_signed) : layers_f32(x_in, step, cos, sin_signed);
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("decode_layers", &decode_layers_cpu); }

}  // namespace idefics3_kit
