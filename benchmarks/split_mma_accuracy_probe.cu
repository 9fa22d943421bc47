// Probe: the error of fp32-accurate products built from split tensor-core operands, on the
// tensor cores themselves (their fp32 accumulation is not IEEE addition, so the NumPy figures
// of benchmarks/tensor_core_estimate.py are checked here). Y = W @ X with W 16 x K (90% of its
// weights zero) and X K x N (a ReLU's output), each split into parts on the host; every
// product of parts whose orders sum to less than the part count is accumulated in one fp32
// accumulator per output; the relative error norm is taken against float64 on the host. Some
// cases add that accumulator into fp32 sums on the ordinary adders every few columns, so the
// tensor cores accumulate only short runs.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/split_mma_accuracy_probe benchmarks/split_mma_accuracy_probe.cu
//   /tmp/split_mma_accuracy_probe
//
// Fragment layouts are the PTX ISA's for mma.m16n8k16 (bf16) and mma.m16n8k8 (tf32), with
// g = lane / 4 and t = lane % 4.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "cuda_probe.cuh"

constexpr int kRows = 16, kDepth = 2304, kColumns = 512, kMaxParts = 3;

// float32 rounded to nearest even with `dropped` low mantissa bits cleared (13: tf32, 16: bf16).
float round_bits(float value, int dropped) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t half = (1u << (dropped - 1)) - 1, keep = (bits >> dropped) & 1u;
  bits = ((bits + half + keep) >> dropped) << dropped;
  std::memcpy(&value, &bits, 4);
  return value;
}

// values as `parts` arrays of the format whose sum is (nearly) the value.
std::vector<std::vector<float>> split(const std::vector<float>& values, int parts, int dropped) {
  std::vector<std::vector<float>> out(parts, std::vector<float>(values.size()));
  for (size_t i = 0; i < values.size(); ++i) {
    float rest = values[i];
    for (int p = 0; p < parts; ++p) {
      out[p][i] = round_bits(rest, dropped);
      rest -= out[p][i];
    }
  }
  return out;
}

__device__ __forceinline__ unsigned bf16_pair(float low, float high) {
  unsigned lo, hi;
  std::memcpy(&lo, &low, 4);
  std::memcpy(&hi, &high, 4);
  return (lo >> 16) | (hi & 0xffff0000u);  // parts are already bf16 values
}

// The MMAs' accumulator added into fp32 sums kept by the ordinary (IEEE) adders, and cleared:
// done every `promote` columns, the tensor cores' own accumulation then spans only those.
__device__ __forceinline__ void promote_sums(float (&d)[4], float (&total)[4]) {
  for (int i = 0; i < 4; ++i) {
    total[i] += d[i];
    d[i] = 0;
  }
}

// An accumulator fragment (rows g and g + 8, columns 2t and 2t + 1 of the 16 x 8 tile at column
// n0) into the row-major kRows x kColumns output.
__device__ __forceinline__ void store_fragment(const float (&c)[4], int g, int t, int n0,
                                               float* y) {
  y[g * kColumns + n0 + 2 * t] = c[0];
  y[g * kColumns + n0 + 2 * t + 1] = c[1];
  y[(g + 8) * kColumns + n0 + 2 * t] = c[2];
  y[(g + 8) * kColumns + n0 + 2 * t + 1] = c[3];
}

// One MMA of a 16 x kDepthStep slice of a w part (from column k0) by the matching slice of an
// x part (8 columns from n0) into d, in the format's fragment layout.
struct Bf16Step {
  static constexpr int kDepthStep = 16;
  __device__ static void mma(float (&d)[4], const float* w, const float* x, int k0, int n0,
                             int g, int t) {
    auto a = [&](int row, int col) { return w[row * kDepth + k0 + col]; };
    auto b = [&](int k) { return x[size_t(k0 + k) * kColumns + n0 + g]; };
    const unsigned a0 = bf16_pair(a(g, 2 * t), a(g, 2 * t + 1));
    const unsigned a1 = bf16_pair(a(g + 8, 2 * t), a(g + 8, 2 * t + 1));
    const unsigned a2 = bf16_pair(a(g, 2 * t + 8), a(g, 2 * t + 9));
    const unsigned a3 = bf16_pair(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9));
    const unsigned b0 = bf16_pair(b(2 * t), b(2 * t + 1));
    const unsigned b1 = bf16_pair(b(2 * t + 8), b(2 * t + 9));
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

struct Tf32Step {
  static constexpr int kDepthStep = 8;
  __device__ static void mma(float (&d)[4], const float* w, const float* x, int k0, int n0,
                             int g, int t) {
    auto a = [&](int row, int col) { return __float_as_uint(w[row * kDepth + k0 + col]); };
    auto b = [&](int k) { return __float_as_uint(x[size_t(k0 + k) * kColumns + n0 + g]); };
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a(g, t)), "r"(a(g + 8, t)), "r"(a(g, t + 4)), "r"(a(g + 8, t + 4)), "r"(b(t)),
          "r"(b(t + 4)));
  }
};

// w: parts x kRows x kDepth, x: parts x kDepth x kColumns (row-major); one warp per 8 columns.
template <typename Step>
__global__ void split_products(const float* w, const float* x, int parts, int promote, float* y) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4, n0 = blockIdx.x * 8;
  float d[4] = {}, total[4] = {};
  for (int k0 = 0; k0 < kDepth; k0 += Step::kDepthStep) {
    if (promote > 0 && k0 % promote == 0) promote_sums(d, total);
    for (int i = 0; i < parts; ++i)
      for (int j = 0; i + j < parts; ++j)
        Step::mma(d, w + size_t(i) * kRows * kDepth, x + size_t(j) * kDepth * kColumns, k0, n0,
                  g, t);
  }
  promote_sums(d, total);
  store_fragment(total, g, t, n0, y);
}

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  std::vector<float> w(kRows * kDepth), x(size_t(kDepth) * kColumns);
  for (auto& v : w) v = uniform(rng) >= 0.9f ? normal(rng) : 0.0f;
  for (auto& v : x) v = std::fmax(normal(rng), 0.0f);
  std::vector<double> exact(kRows * kColumns, 0.0);
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < kDepth; ++k)
      for (int n = 0; n < kColumns; ++n)
        exact[r * kColumns + n] += double(w[r * kDepth + k]) * double(x[size_t(k) * kColumns + n]);
  float *w_device, *x_device, *y_device;
  CHECK(cudaMalloc(&w_device, kMaxParts * w.size() * 4));
  CHECK(cudaMalloc(&x_device, kMaxParts * x.size() * 4));
  CHECK(cudaMalloc(&y_device, exact.size() * 4));
  struct Case { const char* name; bool bf16; int parts, promote; };
  const Case cases[] = {{"tf32, 1 part (plain TF32)", false, 1, 0},
                        {"tf32, 2 parts, 3 products", false, 2, 0},
                        {"bf16, 2 parts, 3 products", true, 2, 0},
                        {"bf16, 3 parts, 6 products", true, 3, 0},
                        {"tf32 x3, sums every 128", false, 2, 128},
                        {"bf16 x3, sums every 128", true, 2, 128},
                        {"bf16 x6, sums every 128", true, 3, 128},
                        {"bf16 x6, sums every 32", true, 3, 32}};
  for (const Case& c : cases) {
    const auto w_parts = split(w, c.parts, c.bf16 ? 16 : 13);
    const auto x_parts = split(x, c.parts, c.bf16 ? 16 : 13);
    for (int p = 0; p < c.parts; ++p) {
      CHECK(cudaMemcpy(w_device + p * w.size(), w_parts[p].data(), w.size() * 4,
                       cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(x_device + p * x.size(), x_parts[p].data(), x.size() * 4,
                       cudaMemcpyHostToDevice));
    }
    CHECK(cudaMemset(y_device, 0xff, exact.size() * 4));  // NaN: unwritten outputs show
    if (c.bf16)
      split_products<Bf16Step><<<kColumns / 8, 32>>>(w_device, x_device, c.parts, c.promote,
                                                  y_device);
    else
      split_products<Tf32Step><<<kColumns / 8, 32>>>(w_device, x_device, c.parts, c.promote,
                                                  y_device);
    CHECK(cudaGetLastError());
    std::vector<float> y(exact.size());
    CHECK(cudaMemcpy(y.data(), y_device, y.size() * 4, cudaMemcpyDeviceToHost));
    double error = 0, norm = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      error += (y[i] - exact[i]) * (y[i] - exact[i]);
      norm += exact[i] * exact[i];
    }
    std::printf("%-30s relative error %.2e\n", c.name, std::sqrt(error / norm));
  }
  CHECK(cudaFree(w_device));
  CHECK(cudaFree(x_device));
  CHECK(cudaFree(y_device));
  return 0;
}
