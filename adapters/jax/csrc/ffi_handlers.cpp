// ffi_handlers.cpp -- XLA FFI handlers that run escoin's forward convolution inside a JAX program:
// one for the CPU, one for CUDA. They reach the core through the table the escoin package hands
// out (escoin.c_api(); escoin_jax_set_api below), not by linking it, so a process holds one core.
//
// Operands (escoin_jax/conv.py builds them): x (N, C, H, W) of the call's dtype, the filter's
// row_ptr as raw bytes (int64 in memory: JAX runs without 64-bit integers by default), its
// stretched offsets (int32) for this geometry, its values (the compute type), the staged CUDA
// kernel's program as bytes (empty for none; the CPU handler ignores it), then the bias (M
// values) and the residual (y's shape), each empty when absent; x, bias, residual and y may
// carry axes jax.vmap added in front (MappedAxes). Attributes: the weight's geometry beyond
// x's shape, and the ReLU.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "escoin/escoin.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The weight's geometry beyond x's shape, and the epilogue: the call's attributes, by name.
struct ConvAttributes {
  int64_t out_channels, kernel_h, kernel_w, stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right, dilation_h, dilation_w, groups;
  bool relu;
};
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ConvAttributes, ffi::StructMember<int64_t>("out_channels"),
    ffi::StructMember<int64_t>("kernel_h"), ffi::StructMember<int64_t>("kernel_w"),
    ffi::StructMember<int64_t>("stride_h"), ffi::StructMember<int64_t>("stride_w"),
    ffi::StructMember<int64_t>("pad_top"), ffi::StructMember<int64_t>("pad_bottom"),
    ffi::StructMember<int64_t>("pad_left"), ffi::StructMember<int64_t>("pad_right"),
    ffi::StructMember<int64_t>("dilation_h"), ffi::StructMember<int64_t>("dilation_w"),
    ffi::StructMember<int64_t>("groups"), ffi::StructMember<bool>("relu"));

namespace {

const escoin_api_t* g_escoin = nullptr;

ffi::Error invalid(std::string message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "escoin: " + message);
}

ffi::Error escoin_failed() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string("escoin: ") + g_escoin->last_error());
}

// The element type of x (and of y, bias, residual) as escoin names it.
bool escoin_dtype(ffi::DataType type, escoin_dtype_t* out) {
  switch (type) {
    case ffi::DataType::F32: *out = ESCOIN_FLOAT32; return true;
    case ffi::DataType::F64: *out = ESCOIN_FLOAT64; return true;
    case ffi::DataType::F16: *out = ESCOIN_FLOAT16; return true;
    case ffi::DataType::BF16: *out = ESCOIN_BFLOAT16; return true;
    default: return false;
  }
}

const void* data_or_null(const ffi::AnyBuffer& buffer) {
  return buffer.element_count() == 0 ? nullptr : buffer.untyped_data();
}

// The operands every call takes, after its context.
struct Operands {
  ffi::AnyBuffer x, row_ptr, offsets, values, program, bias, residual;
};

// The axes jax.vmap added in front of an operand's own (expand_dims: every operand gets each
// of them, of size 1 where it is not mapped), and which block of the operand call i reads.
struct MappedAxes {
  std::vector<int64_t> sizes;

  bool broadcasts_to(const MappedAxes& output) const {
    for (size_t a = 0; a < sizes.size(); ++a)
      if (sizes[a] != output.sizes[a] && sizes[a] != 1) return false;
    return true;
  }
  bool all_ones() const {
    for (int64_t size : sizes)
      if (size != 1) return false;
    return true;
  }
  // The block of this operand that call i (row-major over the output's axes) reads.
  int64_t block(int64_t i, const MappedAxes& output) const {
    int64_t block = 0, stride = 1;
    for (size_t a = sizes.size(); a-- > 0;) {
      const int64_t index = i % output.sizes[a];
      i /= output.sizes[a];
      if (sizes[a] != 1) block += index * stride;
      stride *= sizes[a];
    }
    return block;
  }
};

MappedAxes mapped_axes(const ffi::AnyBuffer& buffer, size_t own_rank) {
  const auto dims = buffer.dimensions();
  return MappedAxes{std::vector<int64_t>(dims.begin(), dims.end() - own_rank)};
}

// What a handler runs: the geometry of one core call, its element type and workspace size, and
// how many calls (one per block of the vmapped axes, or one for all where x, residual and the
// output are mapped alike and the bias is not: their blocks are then consecutive images).
// Checked against the buffers: a wrong shape is an error, never an out-of-bounds access.
struct Call {
  escoin_conv_desc_t desc;
  escoin_dtype_t dtype;
  size_t workspace_bytes;
  int64_t calls;
  MappedAxes y_axes, x_axes, bias_axes, residual_axes;
  size_t x_block, bias_block, out_block;  // bytes of each operand one call reads or writes

  template <typename Launch>
  ffi::Error run(const Operands& in, ffi::AnyBuffer& y, Launch launch) const {
    for (int64_t i = 0; i < calls; ++i) {
      auto at = [&](const ffi::AnyBuffer& buffer, const MappedAxes& axes, size_t bytes) {
        return buffer.element_count() == 0
                   ? nullptr
                   : static_cast<const char*>(buffer.untyped_data()) +
                         size_t(axes.block(i, y_axes)) * bytes;
      };
      if (!launch(at(in.x, x_axes, x_block), at(in.bias, bias_axes, bias_block),
                  at(in.residual, residual_axes, out_block),
                  static_cast<char*>(y.untyped_data()) + size_t(i) * out_block))
        return escoin_failed();
    }
    return ffi::Error::Success();
  }
};

ffi::ErrorOr<Call> describe(const Operands& in, const ffi::AnyBuffer& y,
                            const ConvAttributes& a) {
  if (g_escoin == nullptr) return ffi::Unexpected(invalid("the core's table was not set"));
  Call call;
  if (!escoin_dtype(in.x.element_type(), &call.dtype))
    return ffi::Unexpected(invalid("x must be float32, float64, float16 or bfloat16"));
  if (y.element_type() != in.x.element_type())
    return ffi::Unexpected(invalid("the output's dtype must be x's"));
  const auto dims = in.x.dimensions();
  const size_t rank = dims.size();
  if (rank < 4 || y.dimensions().size() != rank)
    return ffi::Unexpected(invalid("x and the output must be (N, C, H, W) behind the same "
                                   "vmapped axes"));
  const bool has_bias = in.bias.element_count() != 0;
  const bool has_residual = in.residual.element_count() != 0;
  if ((has_bias && in.bias.dimensions().size() < 1) ||
      (has_residual && in.residual.dimensions().size() < 4))
    return ffi::Unexpected(invalid("bias must be (M,) and residual (N, M, OH, OW)"));
  call.x_axes = mapped_axes(in.x, 4);
  call.y_axes = mapped_axes(y, 4);
  call.bias_axes = has_bias ? mapped_axes(in.bias, 1) : call.y_axes;
  call.residual_axes = has_residual ? mapped_axes(in.residual, 4) : call.y_axes;
  if (call.bias_axes.sizes.size() != rank - 4 || call.residual_axes.sizes.size() != rank - 4 ||
      !call.x_axes.broadcasts_to(call.y_axes) || !call.bias_axes.broadcasts_to(call.y_axes) ||
      !call.residual_axes.broadcasts_to(call.y_axes))
    return ffi::Unexpected(invalid("x, bias and residual must be mapped over the output's axes"));
  int64_t blocks = 1;
  for (int64_t size : call.y_axes.sizes) blocks *= size;
  const bool one_call = call.x_axes.sizes == call.y_axes.sizes &&
                        call.residual_axes.sizes == call.y_axes.sizes &&
                        (!has_bias || call.bias_axes.all_ones());
  call.calls = one_call ? 1 : blocks;
  const int64_t images = dims[rank - 4];
  call.desc = escoin_conv_desc_t{one_call ? blocks * images : images,
                                 dims[rank - 3], dims[rank - 2], dims[rank - 1],
                                 a.out_channels, a.kernel_h,   a.kernel_w,     a.stride_h,
                                 a.stride_w,   a.pad_top,      a.pad_bottom,   a.pad_left,
                                 a.pad_right,  a.dilation_h,   a.dilation_w,   a.groups};
  if (has_bias && (in.bias.element_type() != in.x.element_type() ||
                   in.bias.dimensions().back() != a.out_channels))
    return ffi::Unexpected(invalid("bias must hold out_channels values of x's dtype"));
  escoin_layout_t layout;
  if (g_escoin->conv_layout(&call.desc, &layout) != ESCOIN_SUCCESS)
    return ffi::Unexpected(escoin_failed());
  const int64_t per_call = call.desc.batch * a.out_channels * layout.out_height *
                           layout.out_width;
  const size_t outputs = size_t(per_call * call.calls);
  if (y.element_count() != outputs)
    return ffi::Unexpected(invalid("the output has " + std::to_string(y.element_count()) +
                                   " elements, the geometry gives " + std::to_string(outputs)));
  const auto y_dims = y.dimensions();
  if (has_residual && (in.residual.element_type() != in.x.element_type() ||
                       !std::equal(in.residual.dimensions().end() - 4,
                                   in.residual.dimensions().end(), y_dims.end() - 4)))
    return ffi::Unexpected(invalid("residual must have the output's shape and dtype"));
  if (in.row_ptr.size_bytes() != size_t(a.out_channels + 1) * sizeof(int64_t))
    return ffi::Unexpected(invalid("row_ptr must hold out_channels + 1 int64 values"));
  if (in.offsets.element_type() != ffi::DataType::S32)
    return ffi::Unexpected(invalid("offsets must be int32"));
  const ffi::DataType compute =
      call.dtype == ESCOIN_FLOAT64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (in.values.element_type() != compute ||
      in.values.element_count() != in.offsets.element_count())
    return ffi::Unexpected(invalid("values must be one per offset, in the compute type"));
  const size_t element = ffi::ByteWidth(in.x.element_type());
  call.x_block = size_t(call.desc.batch * dims[rank - 3] * dims[rank - 2] * dims[rank - 1]) *
                 element;
  call.bias_block = size_t(a.out_channels) * element;
  call.out_block = size_t(per_call) * element;
  if (g_escoin->workspace_size(&call.desc, call.dtype, &call.workspace_bytes) != ESCOIN_SUCCESS)
    return ffi::Unexpected(escoin_failed());
  return call;
}

ffi::Error cpu_forward(ffi::AnyBuffer x, ffi::AnyBuffer row_ptr, ffi::AnyBuffer offsets,
                       ffi::AnyBuffer values, ffi::AnyBuffer program, ffi::AnyBuffer bias,
                       ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y,
                       ConvAttributes attributes) {
  const Operands in{x, row_ptr, offsets, values, program, bias, residual};
  auto call = describe(in, *y, attributes);
  if (call.has_error()) return call.error();
  // The core takes row_ptr[M] as the number of offsets and values: a larger one read past them.
  const int64_t nnz = static_cast<const int64_t*>(row_ptr.untyped_data())[attributes.out_channels];
  if (nnz != int64_t(offsets.element_count()))
    return invalid("row_ptr[out_channels] is " + std::to_string(nnz) + " but there are " +
                   std::to_string(offsets.element_count()) + " offsets");
  // One workspace per thread, grown as needed and kept (the largest layer's, per XLA thread):
  // XLA's CPU runtime calls handlers from its own threads, and a call runs to completion here.
  thread_local std::vector<unsigned char> workspace;
  if (workspace.size() < call->workspace_bytes) workspace.resize(call->workspace_bytes);
  // The checked entry (the program is the CUDA kernel's, unread here): it validates row_ptr and
  // every offset against the geometry, so no buffer reaching this target can make the kernel
  // read outside x.
  return call->run(in, *y, [&](const void* x_at, const void* bias_at, const void* residual_at,
                               void* y_at) {
    return g_escoin->conv2d_forward_cpu(
               &call->desc, call->dtype, x_at,
               static_cast<const int64_t*>(row_ptr.untyped_data()),
               static_cast<const int32_t*>(data_or_null(offsets)), data_or_null(values),
               bias_at, residual_at, attributes.relu ? 1 : 0, y_at, workspace.data(),
               call->workspace_bytes) == ESCOIN_SUCCESS;
  });
}

ffi::Error cuda_forward(void* stream, int32_t device, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer x, ffi::AnyBuffer row_ptr, ffi::AnyBuffer offsets,
                        ffi::AnyBuffer values, ffi::AnyBuffer program, ffi::AnyBuffer bias,
                        ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y,
                        ConvAttributes attributes) {
  const Operands in{x, row_ptr, offsets, values, program, bias, residual};
  auto call = describe(in, *y, attributes);
  if (call.has_error()) return call.error();
  if (call->dtype == ESCOIN_FLOAT64)
    return invalid("x must be float32, float16 or bfloat16 on CUDA (float64 runs on the CPU)");
  // XLA's scratch memory returns to its allocator when this handler returns, before the kernels
  // queued here have run; that allocator hands memory out in `stream` order, so whatever reuses
  // it runs after them (and so do this handler's own calls, which share it). XLA promises at
  // most 16-byte alignment (a larger request fails), so the workspace is rounded up to the 256
  // bytes the kernels' copies are laid out for inside a slightly larger block.
  constexpr size_t kWorkspaceAlignment = 256, kScratchAlignment = 16;
  auto block = scratch.Allocate(call->workspace_bytes + kWorkspaceAlignment - kScratchAlignment,
                                kScratchAlignment);
  if (!block.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "escoin: XLA's scratch allocator gave no " +
                          std::to_string(call->workspace_bytes) +
                          "-byte workspace (device memory exhausted?)");
  const uintptr_t at = reinterpret_cast<uintptr_t>(*block);
  void* const workspace = reinterpret_cast<void*>((at + kWorkspaceAlignment - 1) &
                                                  ~uintptr_t{kWorkspaceAlignment - 1});
  // The CUDA entry trusts the filter's arrays (they live on the device): escoin_jax.conv2d
  // builds them from one filter object for this geometry.
  return call->run(in, *y, [&](const void* x_at, const void* bias_at, const void* residual_at,
                               void* y_at) {
    return g_escoin->conv2d_forward_cuda(
               &call->desc, call->dtype, x_at,
               static_cast<const int64_t*>(row_ptr.untyped_data()),
               static_cast<const int32_t*>(data_or_null(offsets)), data_or_null(values),
               data_or_null(program), bias_at, residual_at, attributes.relu ? 1 : 0, y_at,
               workspace, call->workspace_bytes, device, stream) == ESCOIN_SUCCESS;
  });
}

// The operands and attributes both handlers bind, after their context.
template <typename Binding>
auto bind_operands(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // row_ptr (bytes)
      .template Arg<ffi::AnyBuffer>()  // offsets
      .template Arg<ffi::AnyBuffer>()  // values
      .template Arg<ffi::AnyBuffer>()  // program (bytes; empty for none)
      .template Arg<ffi::AnyBuffer>()  // bias (empty for none)
      .template Arg<ffi::AnyBuffer>()  // residual (empty for none)
      .template Ret<ffi::AnyBuffer>()  // y
      .template Attrs<ConvAttributes>();
}

}  // namespace

// The library is built with hidden symbols: these three are its interface (escoin_jax/_ffi.py).
#define ESCOIN_JAX_EXPORT extern "C" __attribute__((visibility("default")))
ESCOIN_JAX_EXPORT XLA_FFI_Error* EscoinConv2dCpu(XLA_FFI_CallFrame* call_frame);
ESCOIN_JAX_EXPORT XLA_FFI_Error* EscoinConv2dCuda(XLA_FFI_CallFrame* call_frame);
ESCOIN_JAX_EXPORT int escoin_jax_set_api(const void* table);

XLA_FFI_DEFINE_HANDLER_SYMBOL(EscoinConv2dCpu, cpu_forward, bind_operands(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(EscoinConv2dCuda, cuda_forward,
                              bind_operands(ffi::Ffi::Bind()
                                                .Ctx<ffi::PlatformStream<void*>>()
                                                .Ctx<ffi::DeviceOrdinal>()
                                                .Ctx<ffi::ScratchAllocator>()));

// Takes the core's table from escoin.c_api() (its capsule's pointer); returns 0, or -1 for a table
// older than the one this file was compiled against.
extern "C" int escoin_jax_set_api(const void* table) {
  const auto* api = static_cast<const escoin_api_t*>(table);
  if (api == nullptr || api->version < ESCOIN_API_VERSION) return -1;
  g_escoin = api;
  return 0;
}
