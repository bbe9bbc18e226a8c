// Attention forward, head dim 64 (non-causal and causal). See attention_fwd.cuh.
#include "attention_fwd.cuh"

namespace idefics3_kit {
namespace cuda {

cudaError_t launch_attention_fwd_hd64(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream) {
  return p.causal ? fwd::launch_fwd_hd<64, true>(p, dtype, stream) : fwd::launch_fwd_hd<64, false>(p, dtype, stream);
}

}  // namespace cuda
}  // namespace idefics3_kit
