// empty_pooled / release_pooled: large CPU tensors whose memory is kept for reuse after the
// tensor is freed.
//
// Why: the preprocessing op fills tens of megabytes per call (13 tiles x 3 x 512 x 512 float32
// plus the mask at SmolVLM geometry). A fresh allocation of that size is a fresh mmap, and the
// kernel zeroes every page on first touch: measured, that cost as much as the resize itself
// whenever other work had run between calls. Buffers handed back by the tensors' deleter are
// reused by the next request of the same byte size, already faulted in. The pool holds at most
// IDEFICS3_KIT_POOL_MB megabytes of idle buffers (default 512, 0 disables it), dropping the least
// recently returned ones first; release_pooled() frees them all.
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <utility>

#include "common.h"

namespace idefics3_kit {
namespace {

constexpr size_t kMinPooledBytes = size_t{1} << 20;  // smaller tensors: the plain allocator is cheap
constexpr size_t kAlign = 64;

struct Pool {
  std::mutex mu;
  std::list<std::pair<size_t, void*>> idle;  // (byte size, buffer), most recently returned first
  size_t held = 0;
  const size_t cap = [] {
    const char* env = std::getenv("IDEFICS3_KIT_POOL_MB");
    const long mb = env && *env ? std::strtol(env, nullptr, 10) : 512;
    return mb > 0 ? static_cast<size_t>(mb) << 20 : size_t{0};
  }();
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: tensors may be freed during static destruction
  return *p;
}

void* take(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {  // a handful of entries at most
      if (it->first != bytes) continue;
      void* buf = it->second;
      p.idle.erase(it);
      p.held -= bytes;
      return buf;
    }
  }
  void* buf = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  TORCH_CHECK(buf != nullptr, "empty_pooled: out of memory allocating ", bytes, " bytes");
  return buf;
}

void give_back(void* buf, size_t bytes) {
  Pool& p = pool();
  std::list<std::pair<size_t, void*>> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (bytes <= p.cap) {
      p.idle.emplace_front(bytes, buf);
      p.held += bytes;
      buf = nullptr;
      while (p.held > p.cap) {  // least recently returned first
        p.held -= p.idle.back().first;
        evicted.splice(evicted.begin(), p.idle, std::prev(p.idle.end()));
      }
    }
  }
  std::free(buf);
  for (const auto& entry : evicted) std::free(entry.second);
}

at::Tensor empty_pooled(at::IntArrayRef size, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : size) {
    TORCH_CHECK(s >= 0, "empty_pooled: sizes must be non-negative, got ", size);
    TORCH_CHECK(s == 0 || numel <= INT64_MAX / s, "empty_pooled: ", size, " holds more than 2^63 elements");
    numel *= s;
  }
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t item = c10::elementSize(dtype);
  TORCH_CHECK(numel == 0 || static_cast<size_t>(numel) <= SIZE_MAX / item, "empty_pooled: ", size, " of ", dtype,
              " does not fit in memory addresses");
  const size_t bytes = static_cast<size_t>(numel) * item;
  if (bytes < kMinPooledBytes || pool().cap == 0) return at::empty(size, options);
  void* buf = take(bytes);
  try {
    return at::from_blob(buf, size, [bytes](void* ptr) { give_back(ptr, bytes); }, options);
  } catch (...) {
    give_back(buf, bytes);
    throw;
  }
}

int64_t release_pooled() {
  Pool& p = pool();
  std::list<std::pair<size_t, void*>> idle;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    idle.swap(p.idle);
    p.held = 0;
  }
  int64_t freed = 0;
  for (const auto& [bytes, buf] : idle) {
    std::free(buf);
    freed += static_cast<int64_t>(bytes);
  }
  return freed;
}

}  // namespace

// No tensor arguments to dispatch on: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(idefics3_kit, CompositeExplicitAutograd, m) {
  m.impl("empty_pooled", &empty_pooled);
  m.impl("release_pooled", &release_pooled);
}

}  // namespace idefics3_kit
