// info.cpp -- what this build contains (version, CUDA architectures, OpenMP, kernel limits) and
// how its staged kernel would launch a geometry.
#include "escoin/escoin.h"
#include "cpu_threads.hpp"
#include "error.hpp"
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

escoin_status_t escoin_staged_launch(const escoin_conv_desc_t* desc, int64_t sms,
                                     int64_t blocks_per_sm, int64_t launch[7]) {
  return escoin::guarded([&] {
    // (Bounds a GPU keeps far within, and that keep the launch's arithmetic in 64 bits.)
    if (sms < 1 || sms > 65536) escoin::fail_invalid("sms must be in [1, 65536], got ", sms);
    if (blocks_per_sm < 1 || blocks_per_sm > 255)
      escoin::fail_invalid("blocks_per_sm must be in [1, 255], got ", blocks_per_sm);
    if (!launch) escoin::fail_invalid("launch must not be NULL");
    const escoin::Geometry g = escoin::make_geometry(desc);
    if (g.staged.chunk_channels == 0)
      escoin::fail_invalid("the staged kernel has no plan for this geometry (one input channel "
                           "does not fit its shared memory)");
    const escoin::StagedLaunch s = escoin::staged_launch(g, sms, blocks_per_sm);
    const int64_t numbers[7] = {s.images,      s.positions,
                                s.splits,      s.lead_jobs,
                                s.tail_splits, escoin::staged_jobs(g, s),
                                g.staged.chunks};
    for (int i = 0; i < 7; ++i) launch[i] = numbers[i];
  });
}

int escoin_openmp_max_threads(void) {
#ifdef _OPENMP
  return escoin::cpu_threads_usable() ? omp_get_max_threads() : 1;
#else
  return 1;
#endif
}
}
