// Probe: which lanes and bits carry the metadata of the 2:4 sparse bf16 MMA
// (mma.sp::ordered_metadata m16n8k32), so that a packer can write it. The PTX ISA gives that
// layout as a figure; this probe settles it on the hardware: one MMA of a random 2:4-sparse
// 16 x 32 A (small integers, so every product and sum is exact) by a 32 x 8 B, under each
// candidate layout, compared with the product computed on the host.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/sparse_mma_metadata_probe benchmarks/sparse_mma_metadata_probe.cu
//   /tmp/sparse_mma_metadata_probe
//
// Fixed (as in sparse_mma_loop_probe.cu), with g = lane / 4 and t = lane % 4: A's kept values
// as a dense m16n8k16 A fragment of the 16 x 16 compressed matrix (two per group of four
// columns, in column order); B register j holds rows 8j + 2t and 8j + 2t + 1 of column g; D
// holds rows g and g + 8, columns 2t and 2t + 1. A row's metadata is 8 nibbles, one per group
// of four columns, each the two kept positions (low 2 bits the first); sparsity selector 0.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "cuda_probe.cuh"

constexpr int kM = 16, kK = 32, kN = 8;

__global__ void one_mma(const unsigned* a, const unsigned* b, const unsigned* meta, float* d) {
  const int lane = threadIdx.x;
  float c[4] = {};
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[lane * 4]), "r"(a[lane * 4 + 1]), "r"(a[lane * 4 + 2]), "r"(a[lane * 4 + 3]),
        "r"(b[lane * 4]), "r"(b[lane * 4 + 1]), "r"(b[lane * 4 + 2]), "r"(b[lane * 4 + 3]),
        "r"(meta[lane]));
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = c[i];
}

uint16_t bf16(float value) {  // exact for the small integers used here
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return uint16_t(bits >> 16);
}

unsigned pair(float low, float high) { return bf16(low) | (unsigned(bf16(high)) << 16); }

// A row's 8 nibbles from its kept positions (two per group).
uint32_t row_metadata(const int (&kept)[8][2]) {
  uint32_t word = 0;
  for (int group = 0; group < 8; ++group)
    word |= uint32_t(kept[group][0] | (kept[group][1] << 2)) << (4 * group);
  return word;
}

int main() {
  std::mt19937 rng(1);
  float a[kM][kK] = {}, b[kK][kN];
  int kept[kM][8][2];
  float compressed[kM][16];
  for (int row = 0; row < kM; ++row)
    for (int group = 0; group < 8; ++group) {
      int first = rng() % 4, second = rng() % 3;
      second += second >= first;
      if (first > second) std::swap(first, second);
      kept[row][group][0] = first;
      kept[row][group][1] = second;
      for (int i = 0; i < 2; ++i) {
        const float value = float(int(rng() % 7) - 3 + (rng() % 2 ? 0 : 4));
        a[row][group * 4 + kept[row][group][i]] = value;
        compressed[row][group * 2 + i] = value;
      }
    }
  for (auto& row : b)
    for (float& value : row) value = float(int(rng() % 9) - 4);
  float want[kM][kN] = {};
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n)
      for (int k = 0; k < kK; ++k) want[m][n] += a[m][k] * b[k][n];

  std::vector<unsigned> a_regs(32 * 4), b_regs(32 * 4);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    a_regs[lane * 4 + 0] = pair(compressed[g][2 * t], compressed[g][2 * t + 1]);
    a_regs[lane * 4 + 1] = pair(compressed[g + 8][2 * t], compressed[g + 8][2 * t + 1]);
    a_regs[lane * 4 + 2] = pair(compressed[g][2 * t + 8], compressed[g][2 * t + 9]);
    a_regs[lane * 4 + 3] = pair(compressed[g + 8][2 * t + 8], compressed[g + 8][2 * t + 9]);
    for (int j = 0; j < 4; ++j)
      b_regs[lane * 4 + j] = pair(b[8 * j + 2 * t][g], b[8 * j + 2 * t + 1][g]);
  }
  uint32_t rows[kM];
  for (int row = 0; row < kM; ++row) rows[row] = row_metadata(kept[row]);
  // Candidate layouts: the metadata word of lane 4g + t (lanes with t >= 2 unused at selector 0).
  struct Layout { const char* name; uint32_t (*word)(const uint32_t*, int g, int t); };
  const Layout layouts[] = {
      {"t=0: row g; t=1: row g+8",
       [](const uint32_t* r, int g, int t) { return t == 0 ? r[g] : t == 1 ? r[g + 8] : 0u; }},
      {"t=0: groups 0-3 of rows g | g+8; t=1: groups 4-7",
       [](const uint32_t* r, int g, int t) {
         if (t > 1) return 0u;
         const int shift = 16 * t;
         return ((r[g] >> shift) & 0xffffu) | (((r[g + 8] >> shift) & 0xffffu) << 16);
       }},
      {"t=0: groups 0-3 of rows g | g+8 (low 8 bits each); t=1: groups 4-7",
       [](const uint32_t* r, int g, int t) {
         if (t > 1) return 0u;
         const int shift = 16 * t;
         uint32_t word = 0;
         for (int half = 0; half < 2; ++half) {  // bytes: row g groups, row g+8 groups, ...
           word |= ((r[g] >> (shift + 8 * half)) & 0xffu) << (16 * half);
           word |= ((r[g + 8] >> (shift + 8 * half)) & 0xffu) << (16 * half + 8);
         }
         return word;
       }},
  };
  unsigned *a_device, *b_device, *meta_device;
  float* d_device;
  CHECK(cudaMalloc(&a_device, a_regs.size() * 4));
  CHECK(cudaMalloc(&b_device, b_regs.size() * 4));
  CHECK(cudaMalloc(&meta_device, 32 * 4));
  CHECK(cudaMalloc(&d_device, 32 * 4 * 4));
  CHECK(cudaMemcpy(a_device, a_regs.data(), a_regs.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(b_device, b_regs.data(), b_regs.size() * 4, cudaMemcpyHostToDevice));
  int matches = 0;
  for (const Layout& layout : layouts) {
    std::vector<unsigned> meta(32);
    for (int lane = 0; lane < 32; ++lane) meta[lane] = layout.word(rows, lane / 4, lane % 4);
    CHECK(cudaMemcpy(meta_device, meta.data(), 32 * 4, cudaMemcpyHostToDevice));
    one_mma<<<1, 32>>>(a_device, b_device, meta_device, d_device);
    CHECK(cudaGetLastError());
    std::vector<float> d(32 * 4);
    CHECK(cudaMemcpy(d.data(), d_device, d.size() * 4, cudaMemcpyDeviceToHost));
    int wrong = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i)
        wrong += d[lane * 4 + i] != want[g + 8 * (i / 2)][2 * t + (i % 2)];
    }
    matches += wrong == 0;
    std::printf("%-66s %s (%d of 128 outputs wrong)\n", layout.name,
                wrong == 0 ? "MATCHES" : "no", wrong);
  }
  std::printf("%d layout(s) match\n", matches);
  CHECK(cudaFree(a_device));
  CHECK(cudaFree(b_device));
  CHECK(cudaFree(meta_device));
  CHECK(cudaFree(d_device));
  return matches == 1 ? 0 : 1;
}
