// The blocked CPU attention kernel behind vision_attention and prefill_attention.
//
// Work items are (batch, query head, block of kQBlock query rows), spread over threads with
// at::parallel_for. Per item: S = Q_blk · K[:kv]ᵀ (one GEMM, in the input dtype like the
// reference), a softmax per row in fp32 (key mask as an additive bias, causal rows cut at
// their position), P cast to the input dtype, O = P · V[:kv] written straight into the output.
// kv is the key prefix the block needs (causal blocks skip the keys after their last row),
// and all keys of a row are in one block, so no online-softmax rescaling is needed.
#include "attention_common.h"

namespace idefics3_kit {
namespace {

// Query rows per item: fp32 GEMMs (MKL) are cheap to call, so small blocks whose scores stay
// in L2; bf16 GEMMs (oneDNN) have a per-call cost, so fewer, larger blocks.
constexpr int64_t kQBlockF32 = 64, kQBlockBF16 = 256;

template <typename scalar_t, typename raw_t>
void softmax_block(const at::Tensor& s, at::Tensor& p, int64_t i0, int64_t lq, int64_t lk, bool causal,
                   const float* bias, int64_t first_valid, float scale, std::vector<float>& x) {
  const int64_t n = s.size(0), kv = s.size(1);
  x.resize(kv);
  const raw_t* sp = reinterpret_cast<const raw_t*>(s.data_ptr<scalar_t>());
  raw_t* pp = reinterpret_cast<raw_t*>(p.data_ptr<scalar_t>());
  for (int64_t r = 0; r < n; ++r) {
    const int64_t pos = lk - lq + i0 + r;  // absolute key position of this query
    // Empty rows (no unmasked key at or before the query) get probabilities 0, so output 0:
    // the reference's rule for a query with nothing to attend to.
    const bool empty = causal ? pos < first_valid : first_valid >= lk;
    if (empty) {
      std::fill(pp + r * kv, pp + (r + 1) * kv, raw_t{0});  // 0.0f and bf16 +0 are both all-zero bits
      continue;
    }
    const int64_t valid = causal ? std::min(kv, pos + 1) : kv;
    attn::softmax_row(sp + r * kv, static_cast<int>(kv), static_cast<int>(valid), scale, bias, x.data(),
                      pp + r * kv);
  }
}

}  // namespace

at::Tensor blocked_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& key_mask, double scale, bool causal) {
  check_qkv(op, q, k, v);
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), hkv = k.size(1), lk = k.size(2);
  check_key_mask(op, key_mask, b, lk);
  if (causal)
    TORCH_CHECK(lq <= lk, op, ": causal attention needs Lq <= Lk (queries are the last Lq keys), got Lq = ", lq,
                ", Lk = ", lk);
  at::Tensor out = attention_output(q);
  if (lq == 0) return out;
  const KeyMaskInfo info = key_mask_info(key_mask, b, lk);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t qblock = bf16 ? kQBlockBF16 : kQBlockF32;
  const int64_t groups = hq / hkv, nqb = (lq + qblock - 1) / qblock;
  const float fscale = static_cast<float>(scale);
  // Causal blocks differ in cost (late blocks read more keys): hand out the expensive ones first.
  auto block_of = [&](int64_t t) { return causal ? nqb - 1 - t : t; };
  // Threads only for enough arithmetic (~4 MFLOP each): a parallel region costs a scheduler
  // time slice when other processes hold the cores.
  const int64_t flops = 4 * b * hq * lq * lk * q.size(3) / (causal ? 2 : 1);
  const int64_t max_workers = std::max<int64_t>(1, flops / (int64_t{4} << 20));
  parallel_items<std::vector<float>>(b * hq * nqb, [&](std::vector<float>& x, int64_t it) {
    {
      const int64_t bi = it / (hq * nqb), h = (it / nqb) % hq, qb = block_of(it % nqb);
      const int64_t i0 = qb * qblock, n = std::min(qblock, lq - i0);
      const int64_t first_valid = info.first_valid[bi];
      // Keys this block needs: a causal block stops after its last row.
      const int64_t kv = causal ? lk - lq + i0 + n : lk;
      const at::Tensor qb_rows = q.select(0, bi).select(0, h).narrow(0, i0, n);  // [n, D]
      const at::Tensor kb = k.select(0, bi).select(0, h / groups).narrow(0, 0, kv);  // [kv, D]
      const at::Tensor vb = v.select(0, bi).select(0, h / groups).narrow(0, 0, kv);
      at::Tensor s = at::mm(qb_rows, kb.t());  // [n, kv], input dtype like the reference
      at::Tensor& p = s;                       // probabilities overwrite the scores in place
      const float* bias = info.bias.defined() ? info.bias.data_ptr<float>() + bi * lk : nullptr;
      if (bf16)
        softmax_block<at::BFloat16, uint16_t>(s, p, i0, lq, lk, causal, bias, first_valid, fscale, x);
      else
        softmax_block<float, float>(s, p, i0, lq, lk, causal, bias, first_valid, fscale, x);
      at::Tensor o = out.select(0, bi).select(0, h).narrow(0, i0, n);  // [n, D] rows H*D apart
      at::mm_out(o, p, vb);
    }
  }, max_workers);
  return out;
}

}  // namespace idefics3_kit
