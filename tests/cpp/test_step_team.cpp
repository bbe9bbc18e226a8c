// StepTeam (csrc/include/idefics3_kit/step_team.h), torch-free: every worker of every piece runs
// exactly once, on thread w % the piece's threads, and pieces keep their order, with teams of
// 1-4 threads asked for (the team is capped at the CPUs the process may use) and pieces of more
// workers than the team has threads; no team outside lead or inside
// another region; exceptions from a job on any thread, or from the leader's own code, reach
// lead's caller and leave the team stopped. ChunkClaims: every chunk of every worker runs exactly
// once, a worker's own chunks in increasing order, and a late worker's chunks go to the others.
//   g++ -O1 -std=c++17 -fopenmp -Icsrc/include -Itests/cpp tests/cpp/test_step_team.cpp -o /tmp/t && /tmp/t
#include <idefics3_kit/step_team.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"

using idefics3_kit::StepTeam;

namespace {

// The CPUs this process may run on (StepTeam caps its team there).
int cpus() {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
}

// What csrc/cpu/common.h's for_workers does: the team where this thread leads one, else a loop.
template <class Job>
bool run_workers(int64_t workers, Job& job) {
  if (StepTeam::run(workers, job)) return true;
  for (int64_t w = 0; w < workers; ++w) job(w);
  return false;
}

// 200 pieces of 0-6 workers each; each worker adds its index into its piece's slot and checks
// that the previous piece is complete (the order), and the thread it ran on is recorded.
void pieces_in_order(int threads) {
  constexpr int kPieces = 200;
  std::vector<std::atomic<int64_t>> sums(kPieces);
  std::vector<std::atomic<int>> counts(kPieces);
  for (auto& s : sums) s.store(0);
  for (auto& c : counts) c.store(0);
  std::atomic<int> out_of_order{0}, other_threads{0}, wrong_thread{0};
  const bool team_expected = threads > 1 && cpus() > 1;
  bool leading = false;
  int64_t team_size = 1;
  StepTeam::lead(threads, [&] {
    leading = StepTeam::leading();
    team_size = omp_get_num_threads();
    for (int p = 0; p < kPieces; ++p) {
      const int64_t workers = p % 7;
      const int64_t piece_threads = std::max<int64_t>(1, std::min<int64_t>(workers, team_size));
      auto job = [&](int64_t w) {
        if (p > 0 && counts[p - 1].load() != (p - 1) % 7) out_of_order.fetch_add(1);
        if (omp_get_thread_num() != 0) other_threads.fetch_add(1);
        if (leading && omp_get_thread_num() != w % piece_threads) wrong_thread.fetch_add(1);
        sums[p].fetch_add(w + 1);
        counts[p].fetch_add(1);
      };
      CHECK(run_workers(workers, job) == team_expected);
    }
  });
  for (int p = 0; p < kPieces; ++p) {
    const int64_t w = p % 7;
    CHECK(counts[p].load() == w);
    CHECK(sums[p].load() == w * (w + 1) / 2);
  }
  CHECK(out_of_order.load() == 0);
  CHECK(wrong_thread.load() == 0);  // worker w on thread w % the piece's threads
  CHECK(leading == team_expected);
  if (threads > 1 && omp_get_max_threads() > 1) CHECK(other_threads.load() > 0);  // the team did share the work
  CHECK(!StepTeam::leading());
}

void no_team_outside_lead() {
  int ran = 0;
  auto job = [&](int64_t) { ++ran; };
  CHECK(!StepTeam::run(2, job));
  CHECK(ran == 0);
  // inside a region of its own, lead runs its body alone
  bool inner_leading = true;
#pragma omp parallel num_threads(2)
  {
#pragma omp single
    StepTeam::lead(2, [&] { inner_leading = StepTeam::leading(); });
  }
  CHECK(!inner_leading);
  // a lead inside a lead runs alone, and its pieces go to the outer team
  std::atomic<int> inner_runs{0};
  StepTeam::lead(2, [&] {
    StepTeam::lead(2, [&] {
      auto count = [&](int64_t) { inner_runs.fetch_add(1); };
      CHECK(run_workers(3, count) == (cpus() > 1));
    });
  });
  CHECK(inner_runs.load() == 3);
}

void exceptions_reach_the_caller(int threads) {
  for (int thrower = 0; thrower < 3; ++thrower) {  // worker 0 (the leader), 1, 2
    bool caught = false;
    int pieces_after = 0;
    try {
      StepTeam::lead(threads, [&] {
        auto ok = [](int64_t) {};
        run_workers(3, ok);
        auto bad = [&](int64_t w) {
          if (w == thrower) throw std::runtime_error("job failed");
        };
        run_workers(3, bad);
        ++pieces_after;  // not reached
      });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "job failed";
    }
    CHECK(caught);
    CHECK(pieces_after == 0);
    CHECK(!StepTeam::leading());
  }
  bool caught = false;
  try {
    StepTeam::lead(threads, [] { throw std::invalid_argument("leader failed"); });
  } catch (const std::invalid_argument&) {
    caught = true;
  }
  CHECK(caught);
  // the runtime is usable afterwards
  int after = 0;
  StepTeam::lead(threads, [&] {
    auto job = [&](int64_t w) {
      if (w == 0) ++after;
    };
    run_workers(2, job);
  });
  CHECK(after == 1);
}

// ChunkClaims over a team: workers x 4 chunks each run exactly once; each worker's own chunks in
// increasing order; with worker `late` held back until the others are done, they ran all of
// its chunks (it finds none left); without a team (a plain loop) worker 0 runs everything.
void chunk_claims(int threads, int64_t workers, int64_t late) {
  constexpr int64_t kChunks = 4;
  std::vector<std::atomic<int>> runs(workers * kChunks);
  std::vector<std::atomic<int>> ran_by(workers * kChunks);
  std::atomic<int64_t> finished{0};
  bool teamed = false;
  StepTeam::lead(threads, [&] {
    idefics3_kit::ChunkClaims claims(workers, kChunks);
    auto job = [&](int64_t t) {
      if (t == late)  // held back until every other worker has claimed what it could
        while (finished.load() < workers - 1) std::this_thread::yield();
      int64_t last_own = -1;
      claims.run(t, [&](int64_t u, int64_t c) {
        runs[u * kChunks + c].fetch_add(1);
        ran_by[u * kChunks + c].store(static_cast<int>(t));
        if (u == t) {
          CHECK(c > last_own);  // own chunks in order (a chunk another worker claimed first is skipped)
          last_own = c;
        }
      });
      if (t != late) finished.fetch_add(1);
    };
    teamed = run_workers(workers, job);
  });
  for (int64_t i = 0; i < workers * kChunks; ++i) CHECK(runs[i].load() == 1);
  const int64_t team = std::min<int64_t>({threads, cpus(), workers});
  if (teamed && team == workers && late >= 0)  // each worker on its own thread: the others took `late`'s chunks
    for (int64_t c = 0; c < kChunks; ++c) CHECK(ran_by[late * kChunks + c].load() != late);
  if (!teamed)  // one thread runs the workers in turn: worker 0 claims every chunk
    for (int64_t i = 0; i < workers * kChunks; ++i) CHECK(ran_by[i].load() == 0);
}

}  // namespace

TEST_MAIN(
  for (int threads : {1, 2, 3}) {
    chunk_claims(threads, 2, -1);
    chunk_claims(threads, std::min(threads, cpus()) >= 2 ? std::min(threads, cpus()) : 2, 1);
    chunk_claims(threads, 12, -1);  // more workers than stack counters (8)
  }

  for (int threads : {1, 2, 3, 4}) {
    pieces_in_order(threads);
    exceptions_reach_the_caller(threads);
  }
  no_team_outside_lead();
)
