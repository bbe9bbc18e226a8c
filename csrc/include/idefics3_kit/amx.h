// Intel AMX (tile) support shared by the kernels that use it: availability and the tile
// configuration block. Torch-free.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__CUDACC__) && \
    !defined(IDEFICS3_KIT_NO_AVX512) && (__GNUC__ >= 11 || defined(__clang__))
#define IK_HAVE_AMX_PATH 1

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>

#define IK_AMX_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

namespace idefics3_kit {
namespace amx {

// AMX needs CPU support and, on Linux, a per-process permission for the tile state.
// IDEFICS3_KIT_NO_AMX=1 turns the AMX paths off (comparisons, debugging).
inline bool available() {
  static const bool ok = [] {
    const char* off = std::getenv("IDEFICS3_KIT_NO_AMX");
    if (off && *off && *off != '0') return false;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    if (!amx_bf16 || !amx_tile || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512bf16"))
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// The 64-byte block _tile_loadconfig reads (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace amx
}  // namespace idefics3_kit
#endif
