// Forward attention dispatcher: head dim -> the per-head-dim translation unit. Plain CUDA C++.
#include <cuda_runtime.h>

#include "attention.cuh"

namespace idefics3_kit {
namespace cuda {

cudaError_t launch_attention_fwd_hd64(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);
cudaError_t launch_attention_fwd_hd72(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);
cudaError_t launch_attention_fwd_hd128(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);

bool attention_fwd_supported(int head_dim, bool causal) {
  return head_dim == 64 || head_dim == 128 || (head_dim == 72 && !causal);
}

cudaError_t launch_attention_fwd(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.Lq < 0 || p.Lk < 0) return cudaErrorInvalidValue;
  switch (p.D) {
    case 64: return launch_attention_fwd_hd64(p, dtype, stream);
    case 72: return launch_attention_fwd_hd72(p, dtype, stream);
    case 128: return launch_attention_fwd_hd128(p, dtype, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace idefics3_kit
