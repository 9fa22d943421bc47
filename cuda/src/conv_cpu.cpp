// conv_cpu.cpp -- the CPU forward entry: validate, then run the kernel variant (stretch and
// tiles, cpu_kernels.cpp) of the best instruction set, in the call's storage type.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cpu_kernels.hpp"
#include "error.hpp"
#include "forward_checks.hpp"

namespace escoin {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(ESCOIN_HAVE_X86_VARIANTS)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(ESCOIN_HAVE_X86_VARIANTS)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

enum class CpuVariant { portable, avx2, avx512 };

// The kernel variant forward calls run, chosen once per process: the widest this CPU supports,
// or the one the environment variable ESCOIN_CPU_KERNELS names (to test or compare the others);
// a name this build or CPU cannot run leaves `error` set, which every forward call reports.
struct VariantChoice {
  CpuVariant variant = CpuVariant::portable;
  const char* name = "portable";
  std::string error;
};

VariantChoice choose_variant() {
  VariantChoice best;
  if (cpu_has_avx512())
    best = {CpuVariant::avx512, "avx512", ""};
  else if (cpu_has_avx2())
    best = {CpuVariant::avx2, "avx2", ""};
  const char* wanted = std::getenv("ESCOIN_CPU_KERNELS");
  if (wanted == nullptr || *wanted == '\0') return best;
  const std::string name = wanted;
  if (name == "portable") return {CpuVariant::portable, "portable", ""};
  if ((name == "avx2" && cpu_has_avx2()) || (name == "avx512" && cpu_has_avx512()))
    return {name == "avx2" ? CpuVariant::avx2 : CpuVariant::avx512,
            name == "avx2" ? "avx2" : "avx512", ""};
  best.error = "ESCOIN_CPU_KERNELS is '" + name + "', but this build and CPU run only " +
               std::string(cpu_has_avx512() ? "avx512, avx2 or portable"
                           : cpu_has_avx2() ? "avx2 or portable"
                                            : "portable");
  return best;
}

const VariantChoice& cpu_variant() {
  static const VariantChoice choice = choose_variant();
  return choice;
}

template <typename S>
void run_kernel(const CpuConvArgs<S>& args) {
  switch (cpu_variant().variant) {
#if defined(ESCOIN_HAVE_X86_VARIANTS)
    case CpuVariant::avx512: return avx512::sparse_conv(args);
    case CpuVariant::avx2: return avx2::sparse_conv(args);
#endif
    default: return portable::sparse_conv(args);
  }
}

template <typename S>
void forward(const Geometry& g, const void* x, const int64_t* row_ptr, const int32_t* offsets,
             const void* values, const void* bias, const void* residual, bool relu, void* y,
             void* workspace) {
  using C = Compute<S>;
  run_kernel(CpuConvArgs<S>{&g, static_cast<const S*>(x), static_cast<C*>(workspace), row_ptr,
                            offsets, static_cast<const C*>(values), static_cast<const S*>(bias),
                            static_cast<const S*>(residual), relu, static_cast<S*>(y)});
}

// Both forward entries: they differ in whether the offsets are checked.
escoin_status_t forward_entry(const escoin_conv_desc_t* desc, escoin_dtype_t dtype, const void* x,
                              const int64_t* row_ptr, const int32_t* offsets, const void* values,
                              const void* bias, const void* residual, int relu, void* y,
                              void* workspace, size_t workspace_bytes, bool offsets_trusted) {
  return guarded([&] {
    const Geometry g = make_geometry(desc);
    check_forward_operands(g, dtype, x, row_ptr, "row_ptr", y, bias, residual, workspace,
                           workspace_bytes, escoin::workspace_bytes(g, dtype));
    if (g.d.batch == 0) return;
    const std::string& variant_error = cpu_variant().error;
    if (!variant_error.empty()) fail_invalid(variant_error);
    // Host arrays can be checked cheaply, so the CPU path trusts none it was not told to.
    if (offsets_trusted)
      check_row_ptr(g, row_ptr, offsets, values);
    else
      check_csr_for_geometry(g, row_ptr, offsets, values);
    check_filter_not_overwritten(g, dtype, row_ptr, offsets, values, row_ptr[g.d.out_channels],
                                 y, workspace, escoin::workspace_bytes(g, dtype));
    // (check_forward_operands has rejected any other dtype.)
    using Run = void (*)(const Geometry&, const void*, const int64_t*, const int32_t*,
                         const void*, const void*, const void*, bool, void*, void*);
    const Run run = dtype == ESCOIN_FLOAT32   ? forward<float>
                    : dtype == ESCOIN_FLOAT64 ? forward<double>
                    : dtype == ESCOIN_FLOAT16 ? forward<Float16>
                                              : forward<BFloat16>;
    run(g, x, row_ptr, offsets, values, bias, residual, relu != 0, y, workspace);
  });
}

}  // namespace
}  // namespace escoin

extern "C" escoin_status_t escoin_conv2d_forward_cpu(const escoin_conv_desc_t* desc,
                                                     escoin_dtype_t dtype, const void* x,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, const void* values,
                                                     const void* bias, const void* residual,
                                                     int relu, void* y, void* workspace,
                                                     size_t workspace_bytes) {
  return escoin::forward_entry(desc, dtype, x, row_ptr, offsets, values, bias, residual, relu, y,
                               workspace, workspace_bytes, false);
}

extern "C" escoin_status_t escoin_conv2d_forward_cpu_trusted(
    const escoin_conv_desc_t* desc, escoin_dtype_t dtype, const void* x, const int64_t* row_ptr,
    const int32_t* offsets, const void* values, const void* bias, const void* residual, int relu,
    void* y, void* workspace, size_t workspace_bytes) {
  return escoin::forward_entry(desc, dtype, x, row_ptr, offsets, values, bias, residual, relu, y,
                               workspace, workspace_bytes, true);
}

extern "C" escoin_status_t escoin_cpu_kernels(const char** name) {
  return escoin::guarded([&] {
    escoin::require_pointer(name, "name");
    const escoin::VariantChoice& choice = escoin::cpu_variant();
    if (!choice.error.empty()) escoin::fail_invalid(choice.error);
    *name = choice.name;
  });
}
