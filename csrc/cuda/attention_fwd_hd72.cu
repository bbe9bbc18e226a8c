// Attention forward, head dim 72 (SigLIP-so400m), non-causal only: Q·Kᵀ as 4 m16n8k16 steps plus
// one m16n8k8 step, P·V over 9 n8 blocks -- no padding to 96/128. See attention_fwd.cuh.
#include "attention_fwd.cuh"

namespace idefics3_kit {
namespace cuda {

cudaError_t launch_attention_fwd_hd72(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream) {
  if (p.causal) return cudaErrorInvalidValue;
  return fwd::launch_fwd_hd<72, false>(p, dtype, stream);
}

}  // namespace cuda
}  // namespace idefics3_kit
