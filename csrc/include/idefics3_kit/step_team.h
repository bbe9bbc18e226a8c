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
// w in [0, workers): worker 0 runs on the leader, worker w on the team's thread w (on the leader
// when the team has fewer threads), and run returns once every thread has finished its part, so
// pieces keep the order of body's code.
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

#include <atomic>
#include <cstdint>
#include <exception>
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
  struct State {
    alignas(64) std::atomic<uint64_t> generation{0};  // bumped by the leader: a new piece, or stop
    alignas(64) std::atomic<uint64_t> done{0};        // pieces finished, summed over the team's other threads
    alignas(64) void (*call)(void* job, int64_t worker) = nullptr;  // the current piece
    void* job = nullptr;
    int64_t workers = 0;
    int team = 1;
    bool stop = false;
    std::mutex error_lock;
    std::exception_ptr error;  // the first exception a job threw
  };

  static State*& current() {
    static thread_local State* leading = nullptr;
    return leading;
  }

  // Pauses before yielding: 4096 pauses are ~70 us on a Zen 4 (~64 cycles each; Intel's are
  // longer), more than a step's serial stretches and its pieces, so a quiet machine does not
  // yield.
  static constexpr int kSpins = 1 << 12;
  static void relax(int& spins) {
    if (spins < kSpins) {
      ++spins;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }

  static void record(State& s) {
    std::lock_guard<std::mutex> guard(s.error_lock);
    if (!s.error) s.error = std::current_exception();
  }

  // A team thread t > 0: each new generation, run worker t of the piece (if it has one), then
  // count it done; until the leader says stop.
  static void serve(State& s, int t) {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      uint64_t g;
      while ((g = s.generation.load(std::memory_order_acquire)) == seen) relax(spins);
      seen = g;
      if (s.stop) return;
      if (t < s.workers) {
        try {
          s.call(s.job, t);
        } catch (...) {
          record(s);
        }
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
      s.stop = true;
      s.generation.fetch_add(1, std::memory_order_release);
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
  // The piece is published before its generation; the team's threads read it after seeing
  // that generation, and the next piece is written only after all of them reported this one.
  s->call = [](void* j, int64_t w) { (*static_cast<Job*>(j))(w); };
  s->job = &job;
  s->workers = workers;
  const uint64_t generation = s->generation.load(std::memory_order_relaxed) + 1;
  s->generation.store(generation, std::memory_order_release);
  std::exception_ptr error;
  try {
    if (workers > 0) job(0);
    for (int64_t w = s->team; w < workers; ++w) job(w);  // workers the team has no thread for
  } catch (...) {
    error = std::current_exception();
  }
  // every other thread counts each generation once (the stop generation aside)
  const uint64_t all = (generation) * static_cast<uint64_t>(s->team - 1);
  int spins = 0;
  while (s->done.load(std::memory_order_acquire) != all) relax(spins);
  if (!error && s->error) std::swap(error, s->error);
  if (error) std::rethrow_exception(error);
  return true;
}

}  // namespace idefics3_kit
