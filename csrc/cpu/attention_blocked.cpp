// The blocked CPU attention kernel behind vision_attention and prefill_attention.
//
// Work items are (batch, query head, block of kQBlock query rows), spread over threads with
// at::parallel_for. Per item: S = Q_blk · K[:kv]ᵀ (one GEMM, in the input dtype like the
// reference), a softmax per row in fp32 (masked keys -inf, causal rows cut at their position),
// P cast to the input dtype, O = P · V[:kv] written straight into the output.
// kv is the key prefix the block needs (causal blocks skip the keys after their last row),
// and all keys of a row are in one block, so no online-softmax rescaling is needed.
//
// Non-finite values follow attention_ref: the GEMMs and the float32 softmax carry NaN and inf
// as torch does (a NaN or +inf score makes its row NaN). The reference's P·V also multiplies the
// values of keys a row cannot see by their probability 0, and 0 * NaN = 0 * inf = NaN: so a
// causal block whose skipped keys hold a non-finite value takes them into its GEMMs after all
// (with probability 0), which gives the same NaNs. Rows with no key to attend to are written as
// zeros without any GEMM, whatever q, k and v hold.
#include "attention_common.h"

namespace idefics3_kit {
namespace {

// Query rows per item: fp32 GEMMs (MKL) are cheap to call, so small blocks whose scores stay
// in L2; bf16 GEMMs (oneDNN) have a per-call cost, so fewer, larger blocks: 512 rows when
// non-causal (SigLIP's tiles, 12 heads x 1024 x 64 on an AMD Zen 4: 47-48 ms at 256 rows, 44-45
// at 512, 43-44 at 1024, 52-55 at 128), 256 when causal, whose blocks skip the keys after their
// last row (fewer, larger blocks would skip fewer).
constexpr int64_t kQBlockF32 = 64, kQBlockBF16Causal = 256, kQBlockBF16 = 512;

// oneDNN's bf16 GEMM (at::mm here, torch.matmul in the reference) reads the rows of its first
// operand in pieces of 32 elements: a row whose length is not a multiple of 32 is read past its
// end (into the next row, or the next head of a [B, L, H, D] projection) and what it finds is
// multiplied by zero, so a NaN there makes this row NaN (measured with torch.mm, torch 2.13).
// The first operands of both GEMMs get rows padded with zeros to a multiple of 32 elements,
// which keeps every row to itself. (MKL's float32 GEMM reads only the row: no padding.)
constexpr int64_t kRowPad = 32;
inline int64_t padded_row(int64_t n) { return (n + kRowPad - 1) / kRowPad * kRowPad; }

// Softmax of the block's rows (every one has a key to attend to) from the scores s [n, kv] into
// p [n, kv] (rows p.stride(0) apart, possibly the scores' own memory), in the input dtype. Row
// padding past kv in p is set to 0.
template <typename scalar_t, typename raw_t>
void softmax_block(const at::Tensor& s, at::Tensor& p, int64_t i0, int64_t lq, int64_t lk, bool causal,
                   const uint16_t* keep, float scale, std::vector<float>& x) {
  const int64_t n = s.size(0), kv = s.size(1), ps = p.stride(0);
  x.resize(kv);
  const raw_t* sp = reinterpret_cast<const raw_t*>(s.data_ptr<scalar_t>());
  raw_t* pp = reinterpret_cast<raw_t*>(p.data_ptr<scalar_t>());
  for (int64_t r = 0; r < n; ++r) {
    const int64_t pos = lk - lq + i0 + r;  // absolute key position of this query
    const int64_t valid = causal ? std::min(kv, pos + 1) : kv;
    attn::softmax_row(sp + r * kv, static_cast<int>(kv), static_cast<int>(valid), scale, keep, x.data(),
                      pp + r * ps);
    std::fill(pp + r * ps + kv, pp + (r + 1) * ps, raw_t{0});  // 0.0f and bf16 +0 are both all-zero bits
  }
}

// Per (batch, key/value head): the last key at or after `from` whose value row holds a NaN or an
// infinity, or -1. Causal blocks that end before such a key still multiply it (see above).
std::vector<int64_t> last_nonfinite_values(const at::Tensor& v, int64_t from) {
  const int64_t b = v.size(0), hkv = v.size(1), lk = v.size(2), d = v.size(3);
  std::vector<int64_t> last(b * hkv, -1);
  if (from >= lk) return last;
  const bool bf16 = v.scalar_type() == at::kBFloat16;
  const char* base = static_cast<const char*>(v.data_ptr());
  const int64_t es = v.element_size();
  // Raw reads only (no ATen calls on the worker threads).
  at::parallel_for(0, b * hkv, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* head = base + ((r / hkv) * v.stride(0) + (r % hkv) * v.stride(1)) * es;
      for (int64_t j = lk - 1; j >= from; --j) {
        const char* row = head + j * v.stride(2) * es;
        const bool bad = bf16 ? attn::any_nonfinite(reinterpret_cast<const uint16_t*>(row), d)
                              : attn::any_nonfinite(reinterpret_cast<const float*>(row), d);
        if (bad) {
          last[r] = j;
          break;
        }
      }
    }
  });
  return last;
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
  const int64_t qblock = !bf16 ? kQBlockF32 : causal ? kQBlockBF16Causal : kQBlockBF16;
  const int64_t groups = hq / hkv, nqb = (lq + qblock - 1) / qblock, d = q.size(3);
  const float fscale = static_cast<float>(scale);
  // Causal blocks differ in cost (late blocks read more keys): hand out the expensive ones first.
  auto block_of = [&](int64_t t) { return causal ? nqb - 1 - t : t; };
  // Threads only for enough arithmetic (~4 MFLOP each): a parallel region costs a scheduler
  // time slice when other processes hold the cores.
  const int64_t flops = 4 * b * hq * lq * lk * q.size(3) / (causal ? 2 : 1);
  const int64_t max_workers = std::max<int64_t>(1, flops / (int64_t{4} << 20));
  // Keys that some causal block would skip: from the end of the first block on.
  const std::vector<int64_t> last_bad =
      causal ? last_nonfinite_values(v, lk - lq + std::min(qblock, lq)) : std::vector<int64_t>(b * hkv, -1);
  parallel_items<std::vector<float>>(b * hq * nqb, [&](std::vector<float>& x, int64_t it) {
    const int64_t bi = it / (hq * nqb), h = (it / nqb) % hq, qb = block_of(it % nqb), hk = h / groups;
    int64_t i0 = qb * qblock, n = std::min(qblock, lq - i0);
    // Rows with no key to attend to (before the first unmasked key; all of them when every key is
    // masked) output exact zeros, the reference's rule; they are a prefix of the block.
    const int64_t first_valid = info.first_valid[bi];
    const int64_t empty =
        causal ? std::clamp<int64_t>(first_valid - (lk - lq + i0), 0, n) : (first_valid >= lk ? n : 0);
    if (empty > 0) out.select(0, bi).select(0, h).narrow(0, i0, empty).zero_();
    i0 += empty;
    n -= empty;
    if (n == 0) return;
    // Keys this block needs: a causal block stops after its last row, unless a later key's value
    // is not finite (its probability 0 times that value is NaN in the reference).
    const int64_t kv = causal ? std::max(lk - lq + i0 + n, last_bad[bi * hkv + hk] + 1) : lk;
    at::Tensor qb_rows = q.select(0, bi).select(0, h).narrow(0, i0, n);  // [n, D]
    if (bf16 && d % kRowPad) qb_rows = at::zeros({n, padded_row(d)}, q.options()).narrow(1, 0, d).copy_(qb_rows);
    const at::Tensor kb = k.select(0, bi).select(0, hk).narrow(0, 0, kv);      // [kv, D]
    const at::Tensor vb = v.select(0, bi).select(0, hk).narrow(0, 0, kv);
    at::Tensor s = at::mm(qb_rows, kb.t());  // [n, kv], input dtype like the reference
    // Probabilities overwrite the scores in place, or in bf16 go to rows padded to a multiple of
    // 32 (kRowPad; softmax_block writes the zeros).
    at::Tensor p = bf16 && kv % kRowPad ? at::empty({n, padded_row(kv)}, s.options()).narrow(1, 0, kv) : s;
    const uint16_t* keep = info.row(bi);
    if (bf16)
      softmax_block<at::BFloat16, uint16_t>(s, p, i0, lq, lk, causal, keep, fscale, x);
    else
      softmax_block<float, float>(s, p, i0, lq, lk, causal, keep, fscale, x);
    at::Tensor o = out.select(0, bi).select(0, h).narrow(0, i0, n);  // [n, D] rows H*D apart
    at::mm_out(o, p, vb);
  }, max_workers);
  return out;
}

}  // namespace idefics3_kit
