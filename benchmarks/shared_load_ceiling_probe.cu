// Probe: the fastest a CUDA-core kernel can run whose products each need an input value loaded
// from shared memory, on this GPU. That is the staged kernel's design: a filter's nonzeros are
// data, so each nonzero's products load their inputs (one 32-lane shared-memory load per FMA for
// an unstructured filter, one per four FMAs where four output channels share the nonzero's place:
// the row-group form). docs/performance.md ("Why a kernel that loads per FMA stalls near 4x the
// floor") argues the first is capped near a quarter of the FMA rate; this measures it.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/shared_load_ceiling_probe benchmarks/shared_load_ceiling_probe.cu
//   /tmp/shared_load_ceiling_probe
//
// Every loop below is the staged kernel's inner loop with nothing else: 8 warps a block, four
// blocks an SM, a thread's 8 positions 32 apart in a 48 KB chunk, no copies, barriers or
// epilogue. The loops differ in what an entry (one nonzero) costs:
//   ffma           the FMAs alone, operands in registers: the FMA pipe's rate;
//   rows           8 loads and 8 FMAs an entry, the entry's place and weight free (compile-time
//                  constants): the ceiling of any loop that loads per FMA;
//   rows+entries   the same, each entry's (offset, weight) read by one broadcast load from the
//                  warp's slots, as the staged kernel reads them;
//   groups         8 loads and 32 FMAs an entry (four output channels a load);
//   groups+entries the same, each entry's offset and four weights read by two broadcast loads.
// A rate is useful FLOP/s (2 per FMA); its ratio to the ffma rate is the loop's ceiling as a
// fraction of the FMA pipe's.
#include <cstdio>
#include "cuda_probe.cuh"

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPositions = 8;            // a thread's products, 32 positions apart
constexpr int kRows = 4;                 // a warp's output channels (the row-group form's four)
constexpr int kEntries = 32;             // entries a warp reads from its slots at a time
constexpr int kChunkFloats = 12256;      // the staged kernel's chunk (48 KB less 128 bytes)
constexpr int kReach = 2048;             // entries' offsets fall in [0, kReach)
constexpr int kRounds = 256;             // rounds of kEntries entries a warp

enum class Loop { ffma, rows, rows_entries, groups, groups_entries };

// Useful FMAs of one entry by one thread.
__host__ __device__ constexpr int fmas_per_entry(Loop loop) {
  return loop == Loop::groups || loop == Loop::groups_entries ? kRows * kPositions : kPositions;
}

// Entry j's offset (in [0, kReach)) and weight as compile-time constants: scattered, as a pruned
// filter's places are.
__device__ constexpr int entry_offset(int j) { return (j * 389) % (kReach - 32 * kPositions); }
__device__ constexpr float entry_weight(int j) { return 1.0f / float(j + 3); }

template <Loop loop>
__global__ void __launch_bounds__(kThreads, 4) run(float* out) {
  extern __shared__ float chunk[];
  // Each warp's slots, two sets of kEntries used in alternate rounds (so that no slot load can be
  // hoisted out of the loop): rows (offset, weight) pairs, row groups offsets and four weights.
  __shared__ int2 slot_entries[kWarps][2 * kEntries];
  __shared__ int slot_offsets[kWarps][2 * kEntries];
  __shared__ float4 slot_weights[kWarps][2 * kEntries];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  for (int i = int(threadIdx.x); i < kChunkFloats; i += kThreads) chunk[i] = 1e-3f * (i & 15);
  for (int j = lane; j < 2 * kEntries; j += 32) {
    const int offset = entry_offset(j % kEntries);
    const float w = entry_weight(j % kEntries);
    slot_entries[warp][j] = make_int2(offset, __float_as_int(w));
    slot_offsets[warp][j] = offset;
    slot_weights[warp][j] = make_float4(w, -w, 0.5f * w, 2.0f * w);
  }
  __syncthreads();
  float acc[kRows][kPositions] = {};
  for (int round = 0; round < kRounds; ++round) {
    // A base that moves each round, so that no load can be hoisted out of the loop.
    const float* tile = chunk + lane + (round * 40) % (kChunkFloats - kReach - 32);
    const int slots = (round & 1) * kEntries;
#pragma unroll
    for (int j = 0; j < kEntries; ++j) {
      if constexpr (loop == Loop::ffma) {
        const float v = __int_as_float(0x3a800000 + lane + round);  // ~1e-3, not a constant
#pragma unroll
        for (int i = 0; i < kPositions; ++i) acc[0][i] = fmaf(entry_weight(j), v, acc[0][i]);
      } else if constexpr (loop == Loop::rows || loop == Loop::rows_entries) {
        int offset = entry_offset(j);
        float w = entry_weight(j);
        if constexpr (loop == Loop::rows_entries) {
          const int2 entry = slot_entries[warp][slots + j];
          offset = entry.x;
          w = __int_as_float(entry.y);
        }
#pragma unroll
        for (int i = 0; i < kPositions; ++i) acc[0][i] = fmaf(w, tile[offset + 32 * i], acc[0][i]);
      } else {
        int offset = entry_offset(j);
        const float c = entry_weight(j);
        float4 w = make_float4(c, -c, 0.5f * c, 2.0f * c);
        if constexpr (loop == Loop::groups_entries) {
          offset = slot_offsets[warp][slots + j];
          w = slot_weights[warp][slots + j];
        }
#pragma unroll
        for (int i = 0; i < kPositions; ++i) {
          const float v = tile[offset + 32 * i];
          acc[0][i] = fmaf(w.x, v, acc[0][i]);
          acc[1][i] = fmaf(w.y, v, acc[1][i]);
          acc[2][i] = fmaf(w.z, v, acc[2][i]);
          acc[3][i] = fmaf(w.w, v, acc[3][i]);
        }
      }
    }
  }
  float sum = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kPositions; ++i) sum += acc[r][i];
  out[blockIdx.x * kThreads + threadIdx.x] = sum;
}

template <Loop loop>
double measure(const char* name, int sms, float* out, double ffma_rate) {
  const int blocks = sms * 4;  // one wave: four blocks an SM, as the staged kernel runs
  const size_t shared = kChunkFloats * sizeof(float);
  CHECK(cudaFuncSetAttribute(run<loop>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(shared)));
  const float ms = launch_ms([&](int) { run<loop><<<blocks, kThreads, shared>>>(out); }, 20);
  const double fmas = double(blocks) * kThreads * kRounds * kEntries * fmas_per_entry(loop);
  const double rate = 2 * fmas / (ms * 1e-3);
  std::printf("%-16s %7.1f TFLOP/s", name, rate / 1e12);
  if (ffma_rate > 0) std::printf("  %5.1f%% of ffma, %.2fx its time", 100 * rate / ffma_rate,
                                 ffma_rate / rate);
  std::printf("\n");
  return rate;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  float* out = nullptr;
  CHECK(cudaMalloc(&out, size_t(sms) * 4 * kThreads * sizeof(float)));
  std::printf("%s, %d SMs\n", prop.name, sms);
  const double ffma = measure<Loop::ffma>("ffma", sms, out, 0);
  measure<Loop::rows>("rows", sms, out, ffma);
  measure<Loop::rows_entries>("rows+entries", sms, out, ffma);
  measure<Loop::groups>("groups", sms, out, ffma);
  measure<Loop::groups_entries>("groups+entries", sms, out, ffma);
  CHECK(cudaFree(out));
  return 0;
}
