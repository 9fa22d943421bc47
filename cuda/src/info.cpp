// info.cpp -- what this build contains: version, CUDA architectures, OpenMP, kernel limits.
#include "escoin/escoin.h"
#include "cpu_threads.hpp"
#include "geometry.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef ESCOIN_VERSION
#error "ESCOIN_VERSION must be defined by the build"
#endif
#ifndef ESCOIN_CUDA_ARCHITECTURES
#define ESCOIN_CUDA_ARCHITECTURES ""
#endif

extern "C" {
const char* escoin_version(void) { return ESCOIN_VERSION; }

int escoin_cuda_compiled(void) {
#ifdef ESCOIN_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* escoin_cuda_architectures(void) { return ESCOIN_CUDA_ARCHITECTURES; }

int escoin_openmp_enabled(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

int escoin_tile_min_batch(void) { return int(escoin::kTileMinBatch); }

int escoin_openmp_max_threads(void) {
#ifdef _OPENMP
  return escoin::cpu_threads_usable() ? omp_get_max_threads() : 1;
#else
  return 1;
#endif
}
}
