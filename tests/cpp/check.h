// A tiny test harness: CHECK records failures, main() returns their count (ctest reads it).
#pragma once

#include <cstdio>

namespace ik_test {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace ik_test

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++ik_test::failures();                                                 \
    }                                                                        \
  } while (0)

#define TEST_MAIN(...)                                                          \
  int main() {                                                                  \
    __VA_ARGS__                                                                 \
    if (ik_test::failures()) std::fprintf(stderr, "%d check(s) failed\n", ik_test::failures()); \
    else std::printf("all checks passed\n");                                    \
    return ik_test::failures() ? 1 : 0;                                         \
  }
