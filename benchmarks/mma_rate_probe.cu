// Probe: the issue-bound rate of the warp-level tensor-core instructions (mma.sync and the 2:4
// sparse mma.sp) and of FFMA on this GPU, each as dense-equivalent TFLOP/s. These are the
// ceilings of a tensor-core design for escoin's sparse convolution (docs/performance.md, "Tensor
// cores at fp32 accuracy"): operands stay in registers, so no memory or layout cost is counted.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/mma_rate_probe benchmarks/mma_rate_probe.cu
//   /tmp/mma_rate_probe
// (scripts/tensor_core_probes.sh runs every tensor-core probe)
//
// Each warp runs CHAINS independent accumulators so the instructions' latency is hidden; the
// accumulators are written out so the compiler keeps the work.
#include <cstdio>
#include "cuda_probe.cuh"

constexpr int kChains = 8;
constexpr int kIterations = 4096;

enum class Op { ffma, tf32_m16n8k8, f16_m16n8k16, tf32_sp_m16n8k16, f16_sp_m16n8k32 };

// Dense-equivalent floating-point operations of one instruction by one warp.
__host__ __device__ constexpr double flops_per_warp_instruction(Op op) {
  switch (op) {
    case Op::ffma: return 2.0 * 32;
    case Op::tf32_m16n8k8: return 2.0 * 16 * 8 * 8;
    case Op::f16_m16n8k16: return 2.0 * 16 * 8 * 16;
    case Op::tf32_sp_m16n8k16: return 2.0 * 16 * 8 * 16;
    case Op::f16_sp_m16n8k32: return 2.0 * 16 * 8 * 32;
  }
  return 0;
}

// One MMA on the registers: D (4 f32) += A (4 regs) x B (2 regs dense, 4 sparse), the sparse
// form with its metadata register and selector 0.
#define DENSE_MMA(instruction)                                                              \
  asm volatile(instruction " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"         \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#define SPARSE_MMA(instruction)                                                             \
  asm volatile(instruction " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, "  \
               "%12, 0x0;"                                                                  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), \
                 "r"(b[3]), "r"(meta))

template <Op op>
__device__ __forceinline__ void step(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4],
                                     unsigned meta) {
  if constexpr (op == Op::ffma) {
    d[0] = fmaf(__uint_as_float(a[0]), __uint_as_float(b[0]), d[0]);
  } else if constexpr (op == Op::tf32_m16n8k8) {
    DENSE_MMA("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
  } else if constexpr (op == Op::f16_m16n8k16) {
    DENSE_MMA("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
  } else if constexpr (op == Op::tf32_sp_m16n8k16) {
    SPARSE_MMA("mma.sp::ordered_metadata.sync.aligned.m16n8k16.row.col.f32.tf32.tf32.f32");
  } else {
    SPARSE_MMA("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32");
  }
}

template <Op op>
__global__ void run(float* out, unsigned seed) {
  unsigned a[4], b[4];
  for (int i = 0; i < 4; ++i) {
    // Small normal numbers in every format (0x3c003c00 is two f16 ones; as fp32 it is ~0.0078).
    a[i] = 0x3c003c00u ^ ((seed + threadIdx.x + i) & 0x3u);
    b[i] = 0x3c003c00u ^ ((seed + threadIdx.x * 3 + i) & 0x3u);
  }
  // Metadata of 2:4 (f16: two 2-bit indices per group of four) or 1:2 (tf32) sparsity: each
  // nibble 0b0100 keeps elements 0 and 1 of its group, a valid pattern for both.
  const unsigned meta = 0x44444444u;
  float d[kChains][4] = {};
  for (int it = 0; it < kIterations; ++it) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) step<op>(d[c], a, b, meta);
  }
  float sum = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) sum += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

template <Op op>
void measure(const char* name, int sms, float* out) {
  const int threads = 256, blocks = sms * 8;
  const float ms = launch_ms([&](int rep) { run<op><<<blocks, threads>>>(out, rep); });
  const double warps = double(blocks) * threads / 32;
  const double flops = warps * kIterations * kChains * flops_per_warp_instruction(op);
  std::printf("%-22s %8.1f TFLOP/s (dense-equivalent)\n", name, flops / (ms * 1e-3) / 1e12);
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  float* out = nullptr;
  CHECK(cudaMalloc(&out, size_t(prop.multiProcessorCount) * 8 * 256 * sizeof(float)));
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int sms = prop.multiProcessorCount;
  measure<Op::ffma>("ffma (fp32)", sms, out);
  measure<Op::tf32_m16n8k8>("mma tf32 m16n8k8", sms, out);
  measure<Op::f16_m16n8k16>("mma f16 m16n8k16", sms, out);
  measure<Op::tf32_sp_m16n8k16>("mma.sp tf32 m16n8k16", sms, out);
  measure<Op::f16_sp_m16n8k32>("mma.sp f16 m16n8k32", sms, out);
  CHECK(cudaFree(out));
  return 0;
}
