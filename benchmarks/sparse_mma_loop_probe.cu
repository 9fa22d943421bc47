// Probe: the inner loop of a tensor-core sparse convolution at fp32 accuracy, timed with its
// real operand traffic (docs/performance.md, "Tensor cores at fp32 accuracy"). Values are not
// checked: tensor-core timing does not depend on them; what is measured is whether shared
// memory and the issue slots can feed the 2:4 sparse MMA.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/sparse_mma_loop_probe benchmarks/sparse_mma_loop_probe.cu
//   /tmp/sparse_mma_loop_probe
//
// The design it stands for: a warp owns 16 x HALVES output channels (the MMA's rows) and
// 8 x kFragments output positions. The filter's kept (input channel, tap) columns for those
// rows are packed 2:4 per row; each 32-column step holds, per half, the weights' high and low
// bf16 parts (A fragments, 4 registers each, from global memory through L1) and one metadata
// register. x sits in shared memory as one 32-bit word per (column, position): its bf16 high
// and low parts, so one load gives both. A lane's B register j holds columns 8j + 2t and
// 8j + 2t + 1 (t = lane % 4) at position lane / 4: two loads and two byte permutes give the
// high and the low B registers. Three products per half: hi*hi + hi*lo + lo*hi (4e-6 relative
// error in NumPy; benchmarks/tensor_core_estimate.py).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda_probe.cuh"


constexpr int kFragments = 4;       // 8-position fragments a warp computes per A fragment
constexpr int kSteps = 128;         // 32-column steps in the filter tile
constexpr int kPasses = 16;         // passes over the steps (more work per launch)
constexpr int kSharedWords = 8192;  // x in shared memory (32 KB)
constexpr int kWarps = 8;

__device__ __forceinline__ void sparse_mma(float (&d)[4], const uint4& a, const unsigned (&b)[4],
                                           unsigned meta) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(meta));
}

// A step's A fragments: the weights' bf16 high and low parts and the metadata, per half.
template <int kHalves>
struct Weights {
  uint4 hi[kHalves], lo[kHalves];
  unsigned meta[kHalves];

  __device__ __forceinline__ void load(const uint4* a, const unsigned* meta_words, int step,
                                       int lane) {
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int at = ((step * 2 + h) * 32 + lane) * 2;
      hi[h] = __ldg(&a[at]);
      lo[h] = __ldg(&a[at + 1]);
      meta[h] = __ldg(&meta_words[(step * 2 + h) * 32 + lane]);
    }
  }
};

// a: per step, per half, per lane: high uint4 then low uint4. meta: per step, per half, per
// lane. columns: per step, per t, the 8 shared-memory word offsets of that lane's columns.
// kScheduled: the next step's A fragments load during this step's MMAs, every fragment's B
// registers load first, and the MMAs go product by product, so the three products on one
// accumulator are 4 x kHalves MMAs apart; otherwise each fragment loads and multiplies in turn.
template <int kHalves, bool kScheduled>
__global__ void __launch_bounds__(kWarps * 32)
loop(const uint4* __restrict__ a, const unsigned* __restrict__ meta,
     const int4* __restrict__ columns, const unsigned* __restrict__ x_words, float* out) {
  __shared__ unsigned x[kSharedWords];
  __shared__ int4 column_table[kSteps * 4 * 2];
  for (int i = threadIdx.x; i < kSharedWords; i += blockDim.x) x[i] = x_words[i];
  for (int i = threadIdx.x; i < kSteps * 8; i += blockDim.x) column_table[i] = columns[i];
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int position = (warp * kFragments * 8 + g) % 64;  // positions of this warp's fragments
  float d[kHalves][kFragments][4] = {};
  Weights<kHalves> w, next;
  next.load(a, meta, 0, lane);
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int step = 0; step < kSteps; ++step) {
      if (kScheduled) {
        w = next;
        next.load(a, meta, (step + 1) % kSteps, lane);
      } else {
        w.load(a, meta, step, lane);
      }
      const int4 c0 = column_table[(step * 4 + t) * 2], c1 = column_table[(step * 4 + t) * 2 + 1];
      const int offsets[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      // B registers: columns 8j + 2t and 8j + 2t + 1 at this lane's position of fragment f.
      auto load_b = [&](int f, unsigned (&b_hi)[4], unsigned (&b_lo)[4]) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned w0 = x[offsets[2 * j] + position + 8 * f];
          const unsigned w1 = x[offsets[2 * j + 1] + position + 8 * f];
          b_hi[j] = __byte_perm(w0, w1, 0x7632);  // the high halves: bf16 high parts
          b_lo[j] = __byte_perm(w0, w1, 0x5410);  // the low halves: bf16 low parts
        }
      };
      if (kScheduled) {
        unsigned b_hi[kFragments][4], b_lo[kFragments][4];
#pragma unroll
        for (int f = 0; f < kFragments; ++f) load_b(f, b_hi[f], b_lo[f]);
#pragma unroll
        for (int product = 0; product < 3; ++product)
#pragma unroll
          for (int f = 0; f < kFragments; ++f)
#pragma unroll
            for (int h = 0; h < kHalves; ++h)
              sparse_mma(d[h][f], product == 2 ? w.lo[h] : w.hi[h],
                         product == 1 ? b_lo[f] : b_hi[f], w.meta[h]);
      } else {
#pragma unroll
        for (int f = 0; f < kFragments; ++f) {
          unsigned b_hi[4], b_lo[4];
          load_b(f, b_hi, b_lo);
#pragma unroll
          for (int h = 0; h < kHalves; ++h) {
            sparse_mma(d[h][f], w.hi[h], b_hi, w.meta[h]);
            sparse_mma(d[h][f], w.hi[h], b_lo, w.meta[h]);
            sparse_mma(d[h][f], w.lo[h], b_hi, w.meta[h]);
          }
        }
      }
    }
  }
  float sum = 0;
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int f = 0; f < kFragments; ++f) sum += d[h][f][0] + d[h][f][1] + d[h][f][2] + d[h][f][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// Column offsets: multiples of 8 words (each kx tap a shifted copy of x, so a column's 8
// positions start on 8 banks of their own); `spread` puts the 4 columns a load reads (t = 0..3)
// on 4 different groups of 8 banks, as a packer that orders columns can; otherwise at random.
std::vector<int> column_offsets(bool spread) {
  std::vector<int> offsets(kSteps * 4 * 8);
  const int slots = (kSharedWords - 128) / 32;
  for (int step = 0; step < kSteps; ++step)
    for (int t = 0; t < 4; ++t)
      for (int k = 0; k < 8; ++k) {
        const int bank_group = spread ? t : std::rand() % 4;
        offsets[(step * 4 + t) * 8 + k] = (std::rand() % slots) * 32 + bank_group * 8;
      }
  return offsets;
}

template <int kHalves, bool kScheduled>
void measure(const char* name, bool spread, int sms, const uint4* a, const unsigned* meta,
             const unsigned* x_words, float* out) {
  const std::vector<int> host = column_offsets(spread);
  int4* columns = nullptr;
  CHECK(cudaMalloc(&columns, host.size() * sizeof(int)));
  CHECK(cudaMemcpy(columns, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice));
  const int blocks = sms * 2;
  const float ms = launch_ms([&](int) {
    loop<kHalves, kScheduled><<<blocks, kWarps * 32>>>(a, meta, columns, x_words, out);
  });
  // One product set (three MMAs) counted once: the dense-equivalent rate of fp32-accurate work.
  const double flops = double(blocks) * kWarps * kPasses * kSteps * kFragments * kHalves *
                       (2.0 * 16 * 8 * 32);
  std::printf("%-40s %8.1f TFLOP/s (dense-equivalent, fp32-accurate)\n", name,
              flops / (ms * 1e-3) / 1e12);
  CHECK(cudaFree(columns));
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs\n", prop.name, sms);
  // Weights near 1 in bf16 parts (0x3f80 is 1.0), metadata keeping elements 0 and 1 of each
  // group of four (valid 2:4 metadata in every row).
  std::vector<unsigned> a_host(kSteps * 2 * 32 * 2 * 4), meta_host(kSteps * 2 * 32, 0x44444444u);
  for (auto& word : a_host) word = 0x3f803f80u ^ (std::rand() & 0x7u);
  std::vector<unsigned> x_host(kSharedWords);
  for (auto& word : x_host) word = 0x3f803f80u ^ (std::rand() & 0x7u);
  uint4* a = nullptr;
  unsigned *meta = nullptr, *x_words = nullptr;
  float* out = nullptr;
  CHECK(cudaMalloc(&a, a_host.size() * 4));
  CHECK(cudaMalloc(&meta, meta_host.size() * 4));
  CHECK(cudaMalloc(&x_words, x_host.size() * 4));
  CHECK(cudaMalloc(&out, size_t(sms) * 2 * kWarps * 32 * sizeof(float)));
  CHECK(cudaMemcpy(a, a_host.data(), a_host.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(meta, meta_host.data(), meta_host.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x_words, x_host.data(), x_host.size() * 4, cudaMemcpyHostToDevice));
  measure<2, false>("32-row tiles, columns spread over banks", true, sms, a, meta, x_words, out);
  measure<2, false>("32-row tiles, columns at random banks", false, sms, a, meta, x_words, out);
  measure<1, false>("16-row tiles, columns spread over banks", true, sms, a, meta, x_words, out);
  measure<1, false>("16-row tiles, columns at random banks", false, sms, a, meta, x_words, out);
  measure<2, true>("scheduled: 32-row tiles, spread", true, sms, a, meta, x_words, out);
  measure<2, true>("scheduled: 32-row tiles, random banks", false, sms, a, meta, x_words, out);
  measure<1, true>("scheduled: 16-row tiles, spread", true, sms, a, meta, x_words, out);
  CHECK(cudaFree(a));
  CHECK(cudaFree(meta));
  CHECK(cudaFree(x_words));
  CHECK(cudaFree(out));
  return 0;
}
