// What the standalone CUDA probes in benchmarks/ share: a check that ends the probe with the
// CUDA error's text, and the per-launch time of a kernel launch after warm-up.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CHECK(call)                                                                  \
  do {                                                                               \
    cudaError_t status_ = (call);                                                    \
    if (status_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(status_));          \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

// Milliseconds per call of `launch(rep)` (which queues one kernel on the default stream): two
// warm-up calls, then `reps` calls between two events.
template <typename Launch>
float launch_ms(Launch launch, int reps = 5) {
  for (int warm = 0; warm < 2; ++warm) launch(warm);
  CHECK(cudaGetLastError());
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  CHECK(cudaEventRecord(start));
  for (int rep = 0; rep < reps; ++rep) launch(rep);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  return ms / reps;
}
