// StepTeam (csrc/include/idefics3_kit/step_team.h), torch-free: every worker of every piece runs
// exactly once, on thread w % the piece's threads, and pieces keep their order, with teams of
// 1-4 threads asked for (the team is capped at the CPUs the process may use) and pieces of more
// workers than the team has threads; no team outside lead or inside
// another region; exceptions from a job on any thread, or from the leader's own code, reach
// lead's caller and leave the team stopped.
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

}  // namespace

TEST_MAIN(
  for (int threads : {1, 2, 3, 4}) {
    pieces_in_order(threads);
    exceptions_reach_the_caller(threads);
  }
  no_team_outside_lead();
)
