// One OpenMP region for a whole decode step instead of one per parallel piece (torch-free).
//
// Why: a decode step at SmolVLM-256M shapes runs ~150 short parallel pieces (the four GEMVs and
// the attention of each of 30 layers, each a few to tens of microseconds). Each at::parallel_for
// is an OpenMP region, and GNU libgomp's fork and join each end in a futex_wake system call (its
// barrier wakes sleepers whether or not any sleep): on a Zen 4 (2 threads) an empty region took
// 1.6-1.8 us after 10 us of serial work, a hand-off through two atomics 0.15 us.
//
// StepTeam::lead(threads, body) opens one region: the calling thread (the leader) runs body, the
// step's serial code, while the region's other threads wait; each parallel piece inside body
// goes to them through StepTeam::run (for_workers in csrc/cpu/common.h picks it when the
// calling thread leads a team, at::parallel_for otherwise). A piece is a job(w) for each worker
// w in [0, workers): worker w runs on the team's thread w % threads, where threads is the
// smaller of the piece's workers and the team (thread 0 is the leader), and run returns once
// every worker has finished, so pieces keep the order of body's code. Threads past a piece's
// only see it go by: a large team costs a two-worker piece what a two-thread team does. The team
// has at most as many threads as the process has CPUs (torch may be set to more: spinning
// threads that outnumber the cores would only wait for each other).
//
// Waiting threads spin (with the CPU's pause hint) and then yield, so that on an oversubscribed
// machine a waiting thread gives its core to the one it waits for. Jobs run on plain OpenMP
// threads (torch's thread-local state is not copied to them): they must be raw kernels, no ATen
// ops. An exception from a job or from body reaches lead's caller. Built without OpenMP, lead
// runs body alone (and run() reports no team).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#include <strings.h>  // strcasecmp

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace idefics3_kit {

class StepTeam {
 public:
  // Runs body() on this thread as the leader of a team of `threads` threads (the runtime may
  // give fewer). With one thread, inside another parallel region or inside a team, body runs
  // alone and run() reports no team.
  template <class Body>
  static void lead(int threads, Body&& body);

  // Runs job(w) for w in [0, workers) over the team this thread leads and returns when all are
  // done; false (nothing run) when this thread leads no team.
  template <class Job>
  static bool run(int64_t workers, Job& job);

  // Whether this thread leads a team now.
  static bool leading() { return current() != nullptr; }

 private:
  // The piece being run: its ticket (generation << 32 | workers, or kStop for workers) is
  // published after the rest of it, and read by the team's threads before it.
  struct State {
    alignas(64) std::atomic<uint64_t> ticket{0};
    alignas(64) std::atomic<int64_t> done{0};  // the piece's workers on other threads that finished
    alignas(64) void (*call)(void* job, int64_t worker) = nullptr;
    void* job = nullptr;
    uint64_t generation = 0;  // the leader's count of pieces
    int team = 1;
    std::mutex error_lock;
    std::exception_ptr error;  // the first exception a job threw
  };
  static constexpr uint32_t kStop = 0xFFFFFFFFu;

  static State*& current() {
    static thread_local State* leading = nullptr;
    return leading;
  }

  // Pauses before yielding: 4096 pauses are ~70 us on a Zen 4 (~64 cycles each; Intel's are
  // longer), more than a step's serial stretches and its pieces, so a quiet machine does not
  // yield. With OMP_WAIT_POLICY=passive (the advice for shared machines, which libgomp's own
  // waits follow) a waiting thread yields at once.
  static int spin_limit() {
    static const int limit = [] {
      const char* policy = std::getenv("OMP_WAIT_POLICY");
      return policy != nullptr && strcasecmp(policy, "passive") == 0 ? 0 : 1 << 12;
    }();
    return limit;
  }
  static void relax(int& spins) {
    if (spins < spin_limit()) {
      ++spins;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }

  // The CPUs this process may run on (its affinity mask where the OS has one).
  static int available_cpus() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
  }

  static void record(State& s) {
    std::lock_guard<std::mutex> guard(s.error_lock);
    if (!s.error) s.error = std::current_exception();
  }

  // A team thread t > 0: at each new piece, run its worker t if the piece has one (a thread past
  // the piece's workers does not answer it, so a large team costs a small piece nothing), until
  // the leader says stop.
  static void serve(State& s, int t) {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      uint64_t ticket;
      while ((ticket = s.ticket.load(std::memory_order_acquire)) >> 32 == seen) relax(spins);
      seen = ticket >> 32;
      const uint32_t workers = static_cast<uint32_t>(ticket);
      if (workers == kStop) return;
      const int64_t threads = std::min<int64_t>(workers, s.team);  // the piece's threads
      if (t >= threads) continue;
      try {
        for (int64_t w = t; w < workers; w += threads) s.call(s.job, w);
      } catch (...) {
        record(s);
      }
      s.done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

template <class Body>
void StepTeam::lead(int threads, Body&& body) {
#ifndef _OPENMP
  (void)threads;
  body();
#else
  threads = std::min(threads, available_cpus());  // more spinning threads than CPUs only wait for each other
  if (threads <= 1 || omp_in_parallel() || current() != nullptr) {
    body();
    return;
  }
  State s;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    if (t == 0) {
      s.team = omp_get_num_threads();
      current() = &s;
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      current() = nullptr;
      s.ticket.store((s.generation + 1) << 32 | kStop, std::memory_order_release);
    } else {
      serve(s, t);
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

template <class Job>
bool StepTeam::run(int64_t workers, Job& job) {
  State* s = current();
  if (s == nullptr) return false;
  if (workers >= static_cast<int64_t>(kStop)) {  // not a ticket's worker count: run them here
    for (int64_t w = 0; w < workers; ++w) job(w);
    return true;
  }
  // Worker w runs on the team's thread w % threads (the piece's threads: as many as it has
  // workers, at most the team). The piece is published before its ticket; the next one is
  // written only after every helper of this one reported, and threads past the piece's never
  // read it.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(workers, s->team)), helpers = threads - 1;
  if (helpers > 0) {
    s->call = [](void* j, int64_t w) { (*static_cast<Job*>(j))(w); };
    s->job = &job;
    s->done.store(0, std::memory_order_relaxed);
    s->ticket.store(++s->generation << 32 | static_cast<uint64_t>(workers), std::memory_order_release);
  }
  std::exception_ptr error;
  try {
    for (int64_t w = 0; w < workers; w += threads) job(w);
  } catch (...) {
    error = std::current_exception();
  }
  int spins = 0;
  while (helpers > 0 && s->done.load(std::memory_order_acquire) != helpers) relax(spins);
  if (!error && s->error) std::swap(error, s->error);
  if (error) std::rethrow_exception(error);
  return true;
}

// A piece's work cut into `chunks` chunks per worker, claimed at run time: worker t runs its own
// chunks in order, then any chunk of the other workers that nobody has started (each chunk runs
// exactly once; a claim is one relaxed fetch_add on the owner's counter, so results cannot depend
// on who ran a chunk as long as chunks write disjoint outputs).
//
// Why: a worker that is slow for a moment (its core shared with another process, the host's
// other tenants) used to hold up the whole piece, the other thread waiting for it. With the few-row
// GEMVs' rows in 4 chunks per worker (for_worker_row_ranges, csrc/cpu/common.h), decode steps of
// SmolVLM-256M on a 2-core Zen 3, alternated step by step with the static split: int4 6-7% and int8
// 5% less time quiet (the host's own noise), 12-13% and 9% with a busy process beside them, bf16
// the same quiet and 1.4% less busy. Each worker's own chunks are contiguous and run front to
// back, so the streams the prefetchers follow stay whole when nobody is late (dynamically shared
// small pieces had cost ~5% on a Zen 4).
class ChunkClaims {
 public:
  ChunkClaims(int64_t workers, int64_t chunks) : workers_(workers), chunks_(chunks) {
    if (workers > kLocal) {  // past the counters kept in the object
      heap_.reset(new Counter[workers]);
      next_ = heap_.get();
    }
  }

  // Worker t's share: run(u, c) for each chunk c of worker u it claims, its own first.
  template <class Run>
  void run(int64_t t, Run&& run) {
    claim(t, run);
    for (int64_t d = 1; d < workers_; ++d) claim((t + d) % workers_, run);
  }

 private:
  struct alignas(64) Counter {
    std::atomic<int64_t> next{0};
  };
  static constexpr int64_t kLocal = 8;

  template <class Run>
  void claim(int64_t u, Run& run) {
    std::atomic<int64_t>& next = next_[u].next;
    for (int64_t c; next.load(std::memory_order_relaxed) < chunks_ &&
                    (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks_;)
      run(u, c);
  }

  int64_t workers_, chunks_;
  Counter local_[kLocal];
  std::unique_ptr<Counter[]> heap_;
  Counter* next_ = local_;
};

}  // namespace idefics3_kit
