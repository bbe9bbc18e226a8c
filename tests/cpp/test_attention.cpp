// The CPU attention ops (through the dispatcher, as Python calls them) against a naive loop.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "check.h"

namespace {

using Opt = std::optional<at::Tensor>;

at::Tensor call_blocked(const char* name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const Opt& mask, double scale) {
  static auto& d = c10::Dispatcher::singleton();
  auto op = d.findSchemaOrThrow(name, "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, double)>();
  return op.call(q, k, v, mask, scale);
}

at::Tensor call_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& mask,
                       const Opt& seqlens, double scale) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("idefics3_kit::decode_attention", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                                  double)>();
  return op.call(q, k, v, mask, seqlens, scale);
}

// Naive attention in double: query i at key position lk - lq + i when causal; rows with no key
// left output 0 (the reference semantics).
at::Tensor naive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& mask, double scale,
                 bool causal) {
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), d = q.size(3), hkv = k.size(1), lk = k.size(2);
  auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  auto out = at::zeros({b, hq, lq, d}, at::kDouble);
  auto qa = qd.accessor<double, 4>(), ka = kd.accessor<double, 4>(), va = vd.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t hk = h / (hq / hkv), pos = lk - lq + i;
        std::vector<char> allowed(lk);
        bool any = false;
        for (int64_t j = 0; j < lk; ++j) {
          allowed[j] = (!causal || j <= pos) && (!mask || mask->index({bi, j}).item<bool>());
          any |= allowed[j] != 0;
        }
        std::vector<double> s(lk, -INFINITY);
        double mx = -INFINITY;
        if (!any) continue;  // the output row stays 0
        for (int64_t j = 0; j < lk; ++j) {
          if (!allowed[j]) continue;
          double acc = 0;
          for (int64_t c = 0; c < d; ++c) acc += qa[bi][h][i][c] * ka[bi][hk][j][c];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < lk; ++j) sum += s[j] == -INFINITY ? 0 : std::exp(s[j] - mx);
        for (int64_t j = 0; j < lk; ++j) {
          if (s[j] == -INFINITY) continue;
          const double p = std::exp(s[j] - mx) / sum;
          for (int64_t c = 0; c < d; ++c) oa[bi][h][i][c] += p * va[bi][hk][j][c];
        }
      }
  return out;
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

at::Tensor padding_mask(int64_t b, int64_t lk) {
  auto m = at::ones({b, lk}, at::kBool);
  m.index_put_({0}, false);  // batch 0: nothing to attend, the rows output 0
  if (b > 1) m.index_put_({1, at::indexing::Slice(0, lk / 2)}, false);  // left padding
  return m;
}

void test_vision_and_prefill() {
  at::manual_seed(0);
  for (bool causal : {false, true})
    for (auto [hq, hkv, lq, lk, d] : {std::tuple{4, 4, 37, 37, 72}, {6, 2, 70, 130, 64}, {2, 1, 1, 9, 8}}) {
      if (!causal) lk = lq;
      auto q = at::randn({2, hq, lq, d}), k = at::randn({2, hkv, lk, d}), v = at::randn({2, hkv, lk, d});
      for (bool use_mask : {false, true}) {
        Opt mask = use_mask ? Opt(padding_mask(2, lk)) : std::nullopt;
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        auto out = call_blocked(causal ? "idefics3_kit::prefill_attention" : "idefics3_kit::vision_attention", q, k,
                                v, mask, scale);
        CHECK(max_err(out, naive(q, k, v, mask, scale, causal)) < 1e-5);
        auto out_bf16 = call_blocked(causal ? "idefics3_kit::prefill_attention" : "idefics3_kit::vision_attention",
                                     q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), mask, scale);
        CHECK(max_err(out_bf16, naive(q, k, v, mask, scale, causal)) < 5e-2);
      }
    }
}

void test_decode_on_cache_views() {
  at::manual_seed(1);
  const int64_t b = 3, hq = 8, hkv = 2, d = 128, lk = 700, lmax = 1024;
  auto kc = at::randn({b, hkv, lmax, d}), vc = at::randn({b, hkv, lmax, d});
  auto k = kc.narrow(2, 0, lk), v = vc.narrow(2, 0, lk);  // strided views of the cache
  auto q = at::randn({b, hq, 1, d});
  for (bool use_mask : {false, true}) {
    Opt mask = use_mask ? Opt(padding_mask(b, lk)) : std::nullopt;
    auto out = call_decode(q, k, v, mask, std::nullopt, 0.1);
    CHECK(max_err(out, naive(q, k, v, mask, 0.1, true)) < 1e-5);
    auto out_bf16 = call_decode(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), mask, std::nullopt, 0.1);
    CHECK(max_err(out_bf16, naive(q, k, v, mask, 0.1, true)) < 5e-2);
  }
  // cache_seqlens bounds the keys of each row.
  auto lens = at::tensor({300, 700, 1}, at::kInt);
  auto out = call_decode(q, k, v, std::nullopt, lens, 0.1);
  auto mask = at::arange(lk).unsqueeze(0) < lens.unsqueeze(1);
  CHECK(max_err(out, naive(q, k, v, Opt(mask), 0.1, true)) < 1e-5);
  // bf16 views of a bf16 cache with per-row lengths (the AMX path on CPUs that have it: partial
  // 16-key score blocks and 32-key value blocks at each row's end, a one-key row).
  auto kb = kc.to(at::kBFloat16).narrow(2, 0, lk), vb = vc.to(at::kBFloat16).narrow(2, 0, lk);
  auto out_bf16 = call_decode(q.to(at::kBFloat16), kb, vb, std::nullopt, lens, 0.1);
  CHECK(max_err(out_bf16, naive(q, k, v, Opt(mask), 0.1, true)) < 5e-2);
}

// NaN and inf through the registered ops, as attention_ref gives them: a NaN query row is NaN
// and changes no other row; a NaN value of a masked key (or of a key after a causal row) poisons
// its column; rows with nothing to attend to stay 0. bf16 with a key count and head dim that are
// not multiples of 32 and rows of other heads in between: oneDNN's GEMM must not leak across rows.
void test_nonfinite() {
  at::manual_seed(2);
  const double nan = std::nan("");
  for (auto dtype : {at::kFloat, at::kBFloat16})
    for (bool causal : {false, true}) {
      const int64_t b = 2, h = 3, lq = 70, lk = causal ? 99 : 33, d = 80;
      // [B, L, H, D] memory viewed as [B, H, L, D], as the model's projections
      auto q = at::randn({b, lq, h, d}).to(dtype).transpose(1, 2);
      auto k = at::randn({b, lk, h, d}).to(dtype).transpose(1, 2);
      auto v = at::randn({b, lk, h, d}).to(dtype).transpose(1, 2);
      auto mask = at::ones({b, lk}, at::kBool);
      const int64_t pad = causal ? 40 : 20;  // left padding of batch 1: causal rows before pad - 29 are empty
      mask.index_put_({1, at::indexing::Slice(0, pad)}, false);
      mask.index_put_({0, 5}, false);
      const char* name = causal ? "idefics3_kit::prefill_attention" : "idefics3_kit::vision_attention";
      auto clean = call_blocked(name, q, k, v, Opt(mask), 0.1);
      q.index_put_({0, 1, 36, 7}, nan);  // one query row
      auto out = call_blocked(name, q, k, v, Opt(mask), 0.1);
      auto row_nan = out.isnan().any(-1);  // [B, H, Lq]
      CHECK(row_nan.index({0, 1, 36}).item<bool>());
      CHECK(row_nan.sum().item<int64_t>() == 1);
      auto others = at::ones({b, h, lq}, at::kBool);
      others.index_put_({0, 1, 36}, false);
      CHECK(at::equal(out.index({others}), clean.index({others})));
      v.index_put_({0, 0, 5, 3}, nan);                      // a masked key's value
      v.index_put_({1, 2, lk - 1, 4}, std::numeric_limits<double>::infinity());  // the last key
      out = call_blocked(name, q, k, v, Opt(mask), 0.1);
      CHECK(out.index({0, 0, at::indexing::Slice(), 3}).isnan().all().item<bool>());
      auto col = out.index({1, 2, at::indexing::Slice(), 4});
      if (causal) {  // rows before `first` have no key (zeros); the others give the last key probability 0 but the last
        const int64_t first = pad - (lk - lq);
        CHECK(at::equal(out.index({1, at::indexing::Slice(), at::indexing::Slice(0, first)}),
                        at::zeros({h, first, d}, dtype)));
        CHECK(col.slice(0, first, lq - 1).isnan().all().item<bool>());
        CHECK(col.index({lq - 1}).isinf().item<bool>());
      } else {
        CHECK(col.isinf().all().item<bool>());
      }
    }
  // decode: a NaN query head, a NaN value of a masked key
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    auto q = at::randn({2, 8, 1, 64}).to(dtype), k = at::randn({2, 2, 600, 64}).to(dtype);
    auto v = at::randn({2, 2, 600, 64}).to(dtype);
    auto mask = at::ones({2, 600}, at::kBool);
    mask.index_put_({1, 500}, false);
    auto clean = call_decode(q, k, v, Opt(mask), std::nullopt, 0.125);
    q.index_put_({0, 3, 0, 0}, nan);
    v.index_put_({1, 1, 500, 9}, nan);
    auto out = call_decode(q, k, v, Opt(mask), std::nullopt, 0.125);
    CHECK(out.index({0, 3}).isnan().all().item<bool>());
    CHECK(out.index({1, at::indexing::Slice(4, 8), 0, 9}).isnan().all().item<bool>());
    CHECK(at::equal(out.index({0, at::indexing::Slice(0, 3)}), clean.index({0, at::indexing::Slice(0, 3)})));
    CHECK(at::equal(out.index({1, at::indexing::Slice(0, 4)}), clean.index({1, at::indexing::Slice(0, 4)})));
  }
}

void test_bad_arguments_throw() {
  auto q = at::randn({1, 4, 3, 16}), k = at::randn({1, 2, 5, 16});
  auto throws = [](auto&& fn) {
    try {
      fn();
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  CHECK(throws([&] { call_blocked("idefics3_kit::vision_attention", q.to(at::kHalf), k, k, std::nullopt, 1.0); }));
  CHECK(throws([&] { call_blocked("idefics3_kit::vision_attention", q.narrow(3, 0, 12), k.narrow(3, 0, 12),
                                  k.narrow(3, 0, 12), std::nullopt, 1.0); }));
  CHECK(throws([&] { call_decode(q, k, k, std::nullopt, std::nullopt, 1.0); }));  // Lq != 1
  CHECK(throws([&] { call_decode(q.narrow(2, 0, 1), k, k, std::nullopt, at::tensor({6}, at::kInt), 1.0); }));
}

}  // namespace

TEST_MAIN(test_vision_and_prefill(); test_decode_on_cache_views(); test_nonfinite(); test_bad_arguments_throw();)
