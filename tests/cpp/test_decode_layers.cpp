// decode_layers through the dispatcher, as Python calls it, so ASan + UBSan see the whole step: the
// parameter table, the shape checks, the float32, bf16 and int8 paths, the LM head at the end of a
// step and their error exits. The
// numbers are checked loosely here (a step run twice is the same, bf16 and int8 stay near float32);
// tests/ops/test_decode_ops.py checks the op bit for bit against the Python layers.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include "check.h"

namespace idefics3_kit {  // csrc/cpu/kernels.h
bool silu_mul_rows_as_aten(const uint16_t* gate, const uint16_t* up, int64_t row_stride, uint16_t* out, int64_t rows,
                           int64_t n);
bool silu_mul_matches_aten();
}  // namespace idefics3_kit

namespace {

using Opt = std::optional<at::Tensor>;
using OptList = c10::List<Opt>;

constexpr int64_t kLayers = 2, kBatch = 2, kHidden = 64, kHeads = 4, kKvHeads = 2, kHeadDim = 16, kInter = 96;
constexpr int64_t kPast = 5, kMaxLen = 8;
constexpr int64_t kSlots = 12;  // per layer: in norm, q, k, v, q/k/v bias, o, post norm, gate, up, down

at::Tensor call(const at::Tensor& x, const OptList& params, std::vector<at::Tensor> k_cache,
                std::vector<at::Tensor> v_cache, const at::Tensor& cos, const at::Tensor& sin, const Opt& mask,
                const OptList& scales, const Opt& final_norm = std::nullopt, const Opt& head = std::nullopt,
                const Opt& head_scale = std::nullopt, const Opt& logits = std::nullopt) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("idefics3_kit::decode_layers", "")
                .typed<at::Tensor(const at::Tensor&, const OptList&, at::TensorList, at::TensorList, const at::Tensor&,
                                  const at::Tensor&, const Opt&, int64_t, int64_t, int64_t, double, const OptList&,
                                  const Opt&, const Opt&, const Opt&, const Opt&)>();
  return op.call(x, params, k_cache, v_cache, cos, sin, mask, kPast, kHeads, kKvHeads, 1e-5, scales, final_norm, head,
                 head_scale, logits);
}

// One model's float32 parameters (LAYER_WEIGHTS order, no biases).
std::vector<Opt> make_params() {
  at::manual_seed(3);
  std::vector<Opt> p;
  for (int64_t l = 0; l < kLayers; ++l) {
    const int64_t q = kHeads * kHeadDim, kv = kKvHeads * kHeadDim;
    p.insert(p.end(), {1 + 0.1 * at::randn({kHidden}), 0.1 * at::randn({q, kHidden}), 0.1 * at::randn({kv, kHidden}),
                       0.1 * at::randn({kv, kHidden}), std::nullopt, std::nullopt, std::nullopt,
                       0.1 * at::randn({kHidden, q}), 1 + 0.1 * at::randn({kHidden}), 0.1 * at::randn({kInter, kHidden}),
                       0.1 * at::randn({kInter, kHidden}), 0.1 * at::randn({kHidden, kInter})});
  }
  return p;
}

OptList cast(const std::vector<Opt>& p, at::ScalarType dtype) {
  OptList out;
  for (const Opt& t : p) out.push_back(t ? Opt(t->to(dtype)) : std::nullopt);
  return out;
}

struct Step {
  at::Tensor x, cos, sin;
  Opt mask;
  std::vector<at::Tensor> k_cache, v_cache;
};

Step make_step(at::ScalarType dtype) {
  at::manual_seed(11);
  Step s;
  s.x = at::randn({kBatch, 1, kHidden}).to(dtype);
  const at::Tensor angle = at::rand({kBatch, 1, 1, kHeadDim / 2}) * 3.0;
  const at::Tensor half_cos = at::cos(angle), half_sin = at::sin(angle);
  s.cos = at::cat({half_cos, half_cos}, -1).to(dtype);
  s.sin = at::cat({-half_sin, half_sin}, -1).to(dtype);  // the sine with its first half negated
  at::Tensor mask = at::ones({kBatch, kPast + 1}, at::kBool);
  mask.index_put_({1, 0}, false);  // left padding on the second row
  s.mask = mask;
  for (int64_t l = 0; l < kLayers; ++l) {
    s.k_cache.push_back(at::randn({kBatch, kKvHeads, kMaxLen, kHeadDim}).to(dtype));
    s.v_cache.push_back(at::randn({kBatch, kKvHeads, kMaxLen, kHeadDim}).to(dtype));
  }
  return s;
}

at::Tensor run(const Step& s, const OptList& params, const OptList& scales = OptList(), const Opt& final_norm = std::nullopt,
               const Opt& head = std::nullopt, const Opt& head_scale = std::nullopt, const Opt& logits = std::nullopt) {
  std::vector<at::Tensor> k, v;  // fresh copies: the op writes the new key and value
  for (const auto& c : s.k_cache) k.push_back(c.clone());
  for (const auto& c : s.v_cache) v.push_back(c.clone());
  return call(s.x, params, k, v, s.cos, s.sin, s.mask, scales, final_norm, head, head_scale, logits);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor d = a.to(at::kFloat) - b.to(at::kFloat);
  return (d.norm() / b.to(at::kFloat).norm()).item<double>();
}

bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

void test_paths_agree() {
  const std::vector<Opt> p = make_params();
  const Step s32 = make_step(at::kFloat), s16 = make_step(at::kBFloat16);
  const at::Tensor out32 = run(s32, cast(p, at::kFloat));
  CHECK(out32.sizes() == at::IntArrayRef({kBatch, 1, kHidden}) && out32.isfinite().all().item<bool>());
  CHECK(at::equal(out32, run(s32, cast(p, at::kFloat))));  // deterministic
  const at::Tensor out16 = run(s16, cast(p, at::kBFloat16));
  CHECK(out16.scalar_type() == at::kBFloat16 && rel_err(out16, out32) < 5e-2);
  // int8 weights (per output channel, ops.quant's layout) on every projection
  OptList params = cast(p, at::kBFloat16), scales;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const Opt w = params.get(i);
    const int64_t slot = i % kSlots;
    const bool linear = slot == 1 || slot == 2 || slot == 3 || slot == 7 || slot == 9 || slot == 10 || slot == 11;
    if (!linear) {
      scales.push_back(std::nullopt);
      continue;
    }
    const at::Tensor wf = w->to(at::kFloat);
    const at::Tensor scale = (wf.abs().amax(1) / 127).to(at::kBFloat16);
    params.set(i, at::round(wf / scale.to(at::kFloat).unsqueeze(1)).clamp(-127, 127).to(at::kChar));
    scales.push_back(scale);
  }
  const at::Tensor out8 = run(s16, params, scales);
  CHECK(rel_err(out8, out32) < 1e-1);
  // the final norm: float32 as torch's rms_norm times the weight, exactly; bf16 close to it
  const at::Tensor norm_w = 1 + 0.1 * at::randn({kHidden});
  const at::Tensor normed32 = run(s32, cast(p, at::kFloat), OptList(), norm_w);
  CHECK(at::equal(normed32, norm_w * at::rms_norm(out32, {kHidden}, std::nullopt, 1e-5)));
  const at::Tensor normed16 = run(s16, cast(p, at::kBFloat16), OptList(), norm_w.to(at::kBFloat16));
  CHECK(normed16.scalar_type() == at::kBFloat16 && rel_err(normed16, normed32) < 5e-2);
  CHECK(throws([&] { run(s32, cast(p, at::kFloat), OptList(), at::ones({kHidden + 1})); }));  // wrong length
  CHECK(throws([&] { run(s32, cast(p, at::kFloat), OptList(), norm_w.to(at::kBFloat16)); }));  // wrong dtype
}

void test_bad_arguments_throw() {
  const std::vector<Opt> p = make_params();
  const Step s = make_step(at::kFloat);
  {  // a missing weight
    OptList params = cast(p, at::kFloat);
    params.set(kSlots + 1, std::nullopt);
    CHECK(throws([&] { run(s, params); }));
  }
  {  // a wrong-shaped down_proj (float32 would broadcast it)
    OptList params = cast(p, at::kFloat);
    params.set(11, at::randn({kHidden, kInter + 1}));
    CHECK(throws([&] { run(s, params); }));
  }
  {  // a norm weight of the wrong length
    OptList params = cast(p, at::kFloat);
    params.set(0, at::ones({kHidden - 1}));
    CHECK(throws([&] { run(s, params); }));
  }
  {  // params not a whole number of layers, and scales of the wrong length
    std::vector<Opt> shorter(p.begin(), p.end() - 1);
    CHECK(throws([&] { run(s, cast(shorter, at::kFloat)); }));
    OptList scales;
    scales.push_back(std::nullopt);
    CHECK(throws([&] { run(s, cast(p, at::kFloat), scales); }));
  }
  {  // scales with float32 x: the quantized kernels take bf16 only
    OptList scales;
    for (size_t i = 0; i < p.size(); ++i) scales.push_back(i == 1 ? Opt(at::ones({kHeads * kHeadDim})) : std::nullopt);
    CHECK(throws([&] { run(s, cast(p, at::kFloat), scales); }));
  }
  {  // a weight of the wrong dtype
    OptList params = cast(p, at::kFloat);
    params.set(2, p[2]->to(at::kDouble));
    CHECK(throws([&] { run(s, params); }));
  }
}

// The LM head at the end of a step: logits written into the caller's tensor, float32 exactly
// at::linear of the returned (normed) output, bf16 and an int8 head near it; the argument errors.
void test_head() {
  constexpr int64_t kVocab = 40;
  const std::vector<Opt> p = make_params();
  const Step s32 = make_step(at::kFloat), s16 = make_step(at::kBFloat16);
  const at::Tensor norm_w = 1 + 0.1 * at::randn({kHidden}), head = 0.1 * at::randn({kVocab, kHidden});
  at::Tensor logits32 = at::full({kBatch, 1, kVocab}, 7.0);
  const at::Tensor normed32 = run(s32, cast(p, at::kFloat), OptList(), norm_w, head, std::nullopt, logits32);
  CHECK(at::equal(logits32, at::linear(normed32, head)));
  at::Tensor logits16 = at::zeros({kBatch, 1, kVocab}, at::kBFloat16);
  const at::Tensor head16 = head.to(at::kBFloat16);
  const at::Tensor normed16 = run(s16, cast(p, at::kBFloat16), OptList(), norm_w.to(at::kBFloat16), head16,
                                  std::nullopt, logits16);
  CHECK(rel_err(logits16, at::linear(normed16.to(at::kFloat), head)) < 2e-2 && rel_err(logits16, logits32) < 1e-1);
  // an int8 head (per output channel) on bf16 layers
  const at::Tensor scale = (head.abs().amax(1) / 127).to(at::kBFloat16);
  const at::Tensor q8 = at::round(head / scale.to(at::kFloat).unsqueeze(1)).clamp(-127, 127).to(at::kChar);
  at::Tensor logits8 = at::zeros({kBatch, 1, kVocab}, at::kBFloat16);
  run(s16, cast(p, at::kBFloat16), OptList(), norm_w.to(at::kBFloat16), q8, scale, logits8);
  CHECK(rel_err(logits8, logits16) < 5e-2);
  // errors: a head without logits (and the reverse), without the final norm, a wrong-shaped or
  // wrong-dtype logits or head, scales without a head, a quantized head with float32 x
  const OptList p32 = cast(p, at::kFloat);
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, head); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, std::nullopt, std::nullopt, logits32); }));
  CHECK(throws([&] { run(s32, p32, OptList(), std::nullopt, head, std::nullopt, logits32); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, head, std::nullopt, at::zeros({kBatch, 1, kVocab + 1})); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, head, std::nullopt, at::zeros({kBatch, 1, kVocab}, at::kDouble)); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, at::zeros({kVocab, kHidden + 1}), std::nullopt, logits32); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, head16, std::nullopt, logits32); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, std::nullopt, scale, std::nullopt); }));
  CHECK(throws([&] { run(s32, p32, OptList(), norm_w, q8, scale, logits32); }));
  CHECK(throws([&] {  // non-contiguous logits
    run(s32, p32, OptList(), norm_w, head, std::nullopt, at::zeros({kBatch, 1, 2 * kVocab}).narrow(2, 0, kVocab));
  }));
}

// The bf16 step's fused silu(gate) * up (csrc/cpu/silu_mul_aten.cpp) against ATen's two calls, bit
// for bit, on rows with a vector part and a scalar tail, NaN-making rows included: where it answers,
// it answers exactly; where this build's ATen runs its AVX-512 kernels, it answers.
void test_silu_mul_as_aten() {
  constexpr int64_t kRows = 3, kWidth = 100;  // 64 on the vector path, a tail of 36
  at::manual_seed(7);
  at::Tensor gu = (at::randn({kRows, 2 * kWidth}) * 6).to(at::kBFloat16);
  gu.index_put_({1, 70}, -std::numeric_limits<float>::infinity());  // silu(-inf) is NaN: row 1 is ATen's
  const at::Tensor gate = gu.narrow(1, 0, kWidth), up = gu.narrow(1, kWidth, kWidth);
  at::Tensor want = at::empty({kRows, kWidth}, gu.options());
  at::silu_out(want, gate);
  at::mul_out(want, want, up);
  at::Tensor got = at::zeros({kRows, kWidth}, gu.options());
  const auto* bits = reinterpret_cast<const uint16_t*>(gu.data_ptr<at::BFloat16>());
  const bool answered = idefics3_kit::silu_mul_rows_as_aten(bits, bits + kWidth, 2 * kWidth,
                                                            reinterpret_cast<uint16_t*>(got.data_ptr<at::BFloat16>()),
                                                            kRows, kWidth);
  CHECK(answered == idefics3_kit::silu_mul_matches_aten());
#if defined(__x86_64__) && !defined(IDEFICS3_KIT_NO_AVX512)
  if (at::get_cpu_capability() == "AVX512") CHECK(answered);
#endif
  if (answered) CHECK(at::equal(got.view(at::kShort), want.view(at::kShort)));
}

}  // namespace

TEST_MAIN(test_paths_agree(); test_bad_arguments_throw(); test_head(); test_silu_mul_as_aten();)
