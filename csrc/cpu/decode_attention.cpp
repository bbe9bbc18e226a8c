// decode_attention on CPU: one new query per sequence against the KV cache.
//
// k/v are usually strided views [B, Hkv, L, D] of a preallocated [B, Hkv, Lmax, D] cache. The
// work is split into (batch, key/value head, key range) items: each item reads every K and V
// row of its range once for all Hq / Hkv query heads of the group, keeps an unnormalized partial
// output with its running max and sum, and a log-sum-exp combine merges the ranges. Splitting
// the context is what keeps both threads busy when B * Hkv is small.
#include <atomic>
#include <algorithm>
#include <cstring>
#include <vector>

#include "attention_common.h"
#include "kernels.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kMinSplit = 256;  // keys per item at least (amortizes the per-item setup)
// KV bytes per worker at least. History: with 1 MiB, attention ran on one thread up to ~1400
// tokens and took 26% of the main thread of an int4 step at 900 tokens while the second thread
// idled 74% (perf); 256 KiB ran that step 9-16% faster (both threads past ~680 tokens: two
// workers need twice the bytes, 768 B a token here; ~340 was said). 32 KiB (both threads past ~85
// tokens): on a Zen 4, a layer's call with its cache out of the caches (as in a decode step, which
// streams the weights between layers) took 28.5-28.8 instead of 40.0-40.6 us at 400 tokens,
// 24.7-25.2 instead of 29.5-30.8 at 250, 20.5 instead of 23.7 at 100 (medians of 6, interleaved),
// ~0.35 ms of a step at 400 tokens; 900 tokens unchanged.
constexpr int64_t kMinBytesPerWorker = int64_t{1} << 15;

int64_t split_length(int64_t b, int64_t hkv, int64_t l) {
  const int64_t want_items = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t per_row = std::max<int64_t>(1, (want_items + b * hkv - 1) / (b * hkv));
  return std::max(kMinSplit, (l + per_row - 1) / per_row);
}

void check_seqlens(const std::optional<at::Tensor>& seqlens, int64_t b, int64_t l) {
  const char* op = "decode_attention";
  if (!seqlens) return;
  check_cpu(*seqlens, op, "cache_seqlens");
  check_dtype(*seqlens, at::kInt, op, "cache_seqlens");
  TORCH_CHECK(seqlens->dim() == 1 && seqlens->size(0) == b, op, ": cache_seqlens must be [B] = [", b, "], got ",
              shape_str(*seqlens));
  check_contiguous(*seqlens, op, "cache_seqlens");
  const int32_t* s = seqlens->data_ptr<int32_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(s[i] >= 0 && s[i] <= l, op, ": cache_seqlens[", i, "] must be in [0, ", l, "], got ", s[i]);
}

}  // namespace

void decode_attention_run(const DecodeAttention& a) {
  const int64_t b = a.b, d = a.d, hkv = a.hkv, l = a.l, groups = a.hq / a.hkv;
  if (b == 0) return;
  const int64_t esize = a.bf16 ? 2 : 4;
  const char* qb = static_cast<const char*>(a.q);
  const char* kb = static_cast<const char*>(a.k);
  const char* vb = static_cast<const char*>(a.v);
  char* ob = static_cast<char*>(a.out);

  // Valid keys of each row: j < len[b] and key_mask; a row with none outputs 0 (the reference's
  // rule for a query with nothing to attend to) and reads no keys.
  std::vector<int64_t> len(b, l);
  std::vector<const uint8_t*> mask(b, nullptr);
  std::vector<char> empty(b, 0);
  for (int64_t i = 0; i < b; ++i) {
    if (a.seqlens) len[i] = a.seqlens[i];
    const uint8_t* m = a.key_mask ? a.key_mask + i * a.mask_s0 : nullptr;
    bool any = false;
    for (int64_t j = 0; j < len[i] && !any; ++j) any = !m || m[j];
    mask[i] = m;
    empty[i] = !any;
  }

  const int64_t split = split_length(b, hkv, l), nsplit = (l + split - 1) / split;
  // Partial results [B, Hkv, nsplit, G, D] and their max / sum [B, Hkv, nsplit, G].
  // (kept per thread and grown as needed: a decode step calls this once per layer, and fresh
  // buffers each time were a measurable part of its non-GEMV time)
  thread_local std::vector<float> partials;
  const int64_t parts = b * hkv * nsplit * groups;
  if (static_cast<int64_t>(partials.size()) < parts * (d + 2)) partials.resize(static_cast<size_t>(parts * (d + 2)));
  float* op_ = partials.data();            // [B, Hkv, nsplit, G, D]
  float* mp = op_ + parts * d;             // [B, Hkv, nsplit, G]
  float* lp = mp + parts;                  // [B, Hkv, nsplit, G]

  // Combine the splits of one (batch, key/value head) group into its G query heads' outputs.
  auto combine = [&](int64_t group) {
    const int64_t bi = group / hkv, hk = group % hkv, base = group * nsplit;
    for (int64_t g = 0; g < groups; ++g) {
      char* dst = ob + (bi * a.o_s0 + (hk * groups + g) * a.o_s1) * esize;
      if (empty[bi]) {
        std::memset(dst, 0, static_cast<size_t>(d * esize));
        continue;
      }
      const float* o = op_ + base * groups * d + g * d;
      const float* m = mp + base * groups + g;
      const float* lsum = lp + base * groups + g;
      if (a.bf16)
        attn::decode_combine(d, nsplit, o, groups * d, m, lsum, groups, reinterpret_cast<uint16_t*>(dst));
      else
        attn::decode_combine(d, nsplit, o, groups * d, m, lsum, groups, reinterpret_cast<float*>(dst));
    }
  };
  // Items are handed out dynamically (an atomic counter) rather than as fixed ranges: on a busy
  // machine a descheduled thread then delays the op by one item, not by half of them. The thread
  // that finishes the last split of a group combines it, so there is a single parallel region.
  const int64_t items = b * hkv * nsplit;
  std::atomic<int64_t> next{0};
  std::vector<std::atomic<int64_t>> done(b * hkv);
  for (auto& c : done) c.store(0);
  // Threads only for enough bytes (kMinBytesPerWorker): a parallel region costs microseconds on a
  // quiet machine. On a busy one the items, handed out dynamically, let the running thread do a
  // descheduled worker's share, though the region's end still waits for that worker to return.
  const int64_t kv_bytes = 2 * b * hkv * l * d * esize;
  const int64_t max_workers = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t workers = std::clamp<int64_t>(kv_bytes / kMinBytesPerWorker, 1, max_workers);
  const bool scratch = !attn::decode_uses_amx(a.bf16, d, groups);
  for_workers(workers, [&](int64_t) {
    thread_local std::vector<float> qf, row, x;  // each worker's scratch, written before it is read
    if (scratch) {
      qf.resize(std::max(qf.size(), static_cast<size_t>(groups * d)));
      row.resize(std::max(row.size(), static_cast<size_t>(d)));
      x.resize(std::max(x.size(), static_cast<size_t>(attn::decode_scratch_floats(groups, split))));
    }
    for (int64_t it = next.fetch_add(1); it < items; it = next.fetch_add(1)) {
      const int64_t bi = it / (hkv * nsplit), hk = (it / nsplit) % hkv, s = it % nsplit;
      if (empty[bi]) {
        if (done[bi * hkv + hk].fetch_add(1, std::memory_order_acq_rel) + 1 == nsplit) combine(bi * hkv + hk);
        continue;
      }
      const int64_t j0 = std::min(s * split, len[bi]), j1 = std::min((s + 1) * split, len[bi]);
      attn::DecodeArgs da;
      da.d = d;
      da.groups = groups;
      da.scale = static_cast<float>(a.scale);
      da.q = qb + (bi * a.q_s0 + hk * groups * a.q_s1) * esize;
      da.q_stride = a.q_s1;
      da.k = kb + (bi * a.k_s0 + hk * a.k_s1) * esize;
      da.v = vb + (bi * a.v_s0 + hk * a.v_s1) * esize;
      da.k_stride = a.k_s2;
      da.v_stride = a.v_s2;
      da.key_mask = mask[bi];
      attn::decode_partial(da, a.bf16, j0, j1, op_ + it * groups * d, mp + it * groups, lp + it * groups, qf.data(),
                           row.data(), x.data());
      if (done[bi * hkv + hk].fetch_add(1, std::memory_order_acq_rel) + 1 == nsplit) combine(bi * hkv + hk);
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_mask,
                                const std::optional<at::Tensor>& cache_seqlens, double scale) {
  const char* op = "decode_attention";
  check_qkv(op, q, k, v);
  const int64_t b = q.size(0), l = k.size(2);
  TORCH_CHECK(q.size(2) == 1, op, ": q must hold one query per sequence ([B, H, 1, D]), got shape ", shape_str(q));
  check_key_mask(op, key_mask, b, l);
  check_seqlens(cache_seqlens, b, l);
  at::Tensor out = attention_output(q);
  DecodeAttention a;
  a.b = b;
  a.hq = q.size(1);
  a.hkv = k.size(1);
  a.l = l;
  a.d = q.size(3);
  a.bf16 = q.scalar_type() == at::kBFloat16;
  a.q = q.data_ptr();
  a.q_s0 = q.stride(0);
  a.q_s1 = q.stride(1);
  a.set_kv(k, v);
  a.key_mask = key_mask ? reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>()) : nullptr;
  a.mask_s0 = l;
  a.seqlens = cache_seqlens ? cache_seqlens->data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr();
  a.o_s0 = out.stride(0);
  a.o_s1 = out.stride(1);
  a.scale = scale;
  decode_attention_run(a);
  return out;
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace idefics3_kit
