// native_kernel.cpp -- escoin::sparse_conv2d's CUDA kernel in C++, for calls whose filter and
// geometry it has seen, and the op's autograd kernel.
//
// torch.compile's code calls the op once per layer on every forward. Its Python kernel (ops.py)
// checks every argument, finds the filter built for the CSR tensors' contents and allocates
// through Python: tens of microseconds of host time a call, more than a small layer's GPU time.
// Here the first call of each (CSR contents, input geometry) still runs that Python kernel, which
// checks the arguments, builds and uploads the filter, and hands its prepared call back
// (remember); later calls with the same key go from the dispatcher straight to the core's CUDA
// entry (through escoin.c_api(), as escoin-jax's handlers do: the process holds one core).
//
// The key is what makes a remembered call valid for a new one: the CSR tensors' storage,
// offset, length and version counter (an in-place write bumps the version: a new key, so a new
// filter), x's shape and dtype, the device and the geometry. A storage freed and another
// allocated at its address is told apart by a weak reference to the old one. Calls the fast path
// does not take (x not contiguous NCHW, a bias or residual of another shape, dtype or device,
// inference tensors, an unseen key) run the Python kernel, which also raises any error.
//
// The autograd kernel runs first on every call outside inference mode (torch.no_grad included):
// where no gradient is to be recorded and no tangent carried it goes on down the dispatcher at
// once, so such a call enters Python nowhere on the fast path; elsewhere native_training.cpp
// records the call where it can (a training step's calls on a known pattern), and ops.py's
// _recorded, through its autograd.Function, the rest.
#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "native_calls.h"

namespace escoin_native {

const escoin_api_t* g_api = nullptr;

PreparedCall prepared_call_of(const py::object& call) {
  py::tuple fields = call.attr("native_arguments")();
  py::tuple d = fields[0];
  TORCH_CHECK(d.size() == 16 && fields.size() == 10,
              "escoin_torch._native: escoin.PreparedCall.native_arguments() has another form "
              "than this build expects");
  PreparedCall out;
  auto field = [&d](int i) { return d[size_t(i)].cast<int64_t>(); };
  out.desc = escoin_conv_desc_t{field(0),  field(1),  field(2),  field(3), field(4),  field(5),
                                field(6),  field(7),  field(8),  field(9), field(10), field(11),
                                field(12), field(13), field(14), field(15)};
  out.dtype = escoin_dtype_t(fields[1].cast<int>());
  out.device = fields[2].cast<int>();
  out.row_ptr = reinterpret_cast<const int64_t*>(fields[3].cast<uintptr_t>());
  out.offsets = reinterpret_cast<const int32_t*>(fields[4].cast<uintptr_t>());
  out.values = reinterpret_cast<const void*>(fields[5].cast<uintptr_t>());
  out.tile_program = reinterpret_cast<const void*>(fields[6].cast<uintptr_t>());
  out.workspace_bytes = fields[7].cast<size_t>();
  out.generation = reinterpret_cast<const int64_t*>(fields[8].cast<uintptr_t>());
  out.prepared_generation = fields[9].cast<int64_t>();
  py::tuple shape = call.attr("output_shape");
  for (size_t i = 0; i < 4; ++i) out.output_shape[i] = shape[i].cast<int64_t>();
  return out;
}

}  // namespace escoin_native

namespace {

using namespace escoin_native;

struct Remembered {
  PreparedCall call;
  // The CSR tensors' storages: expired once freed, so that a new storage at a freed one's
  // address never matches.
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  // The Python PreparedCall, which keeps the filter (and the arrays above) alive. Released only
  // with the GIL held (remember, forget); the map is never destroyed, since at exit Python may
  // be gone before static destructors run.
  py::object owner;
  bool alive() const { return !any_expired(storages) && call.current(); }
};

py::object* g_python_kernel = nullptr;  // ops.py's kernel, for every call not taken here
py::object* g_recorder = nullptr;  // ops.py's _recorded, for calls with a gradient or tangent
std::mutex g_mutex;
auto* g_calls = new std::unordered_map<CallKey, Remembered, CallKeyHash>();
std::atomic<int64_t> g_fast_calls{0};  // calls run here (tests check the fast path is taken)
std::atomic<int64_t> g_recorded_calls{0};  // calls the autograd kernel handed to _recorded

// Calls ops.py's function in `*function` (handed over by set_python_kernel or set_recorder;
// `name` says which for the error) with the op's arguments.
at::Tensor call_python(py::object* const* function, const char* name, const at::Tensor& x,
                       const at::Tensor& row_ptr, const at::Tensor& col_idx,
                       const at::Tensor& values, c10::IntArrayRef weight_shape,
                       const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                       bool relu, const std::optional<at::Tensor>& residual) {
  py::gil_scoped_acquire gil;  // (first: the setters write the pointers under the GIL)
  TORCH_CHECK(*function != nullptr, "escoin_torch._native: ", name,
              " was not handed over (import escoin_torch.ops first)");
  py::object y = (**function)(x, row_ptr, col_idx, values, weight_shape.vec(), bias,
                              stride.vec(), padding.vec(), dilation.vec(), groups, relu,
                              residual);
  return y.cast<at::Tensor>();
}

// The op's CUDA kernel (same schema as ops.py's _SCHEMA).
at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& values,
                              c10::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation, int64_t groups, bool relu,
                              const std::optional<at::Tensor>& residual) {
  CallKey key;
  std::optional<PreparedCall> found;
  if (kStreamHandles && g_api != nullptr &&
      call_key(x, row_ptr, col_idx, values, weight_shape, stride, padding, dilation, groups,
               &key)) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_calls->find(key);
    if (it != g_calls->end() && it->second.alive()) found = it->second.call;
  }
  if (!found || !plain_operand(bias, x, {weight_shape[0]}) ||
      !plain_operand(residual, x, found->output_shape)) {
    return call_python(&g_python_kernel, "the Python kernel", x, row_ptr, col_idx, values,
                       weight_shape, bias, stride, padding, dilation, groups, relu, residual);
  }
  // Output and workspace from torch's caching allocator, the launch on torch's current stream:
  // stream-ordered, and legal inside CUDA graph capture.
  at::Tensor y = at::empty(found->output_shape, x.options());
  at::Tensor workspace =
      at::empty({int64_t(found->workspace_bytes)}, x.options().dtype(at::kByte));
  void* stream = current_stream_of(x);
  escoin_status_t status = g_api->conv2d_forward_cuda(
      &found->desc, found->dtype, x.const_data_ptr(), found->row_ptr, found->offsets,
      found->values, found->tile_program, address_of(bias), address_of(residual), relu ? 1 : 0,
      y.data_ptr(), workspace.data_ptr(), found->workspace_bytes, found->device, stream);
  TORCH_CHECK_VALUE(status == ESCOIN_SUCCESS, "escoin: ", g_api->last_error());
  ++g_fast_calls;
  return y;
}

// Whether autograd must see a call with `t` among its tensors: a gradient to record (gradients
// on and `t` requiring one) or a tangent to carry (forward-mode AD's one level, level 0: torch
// does not nest them). torch.func's transforms reach the op through ops._call_op, which applies
// _SparseConv2dFunction itself.
bool autograd_sees(const at::Tensor& t, bool grad_mode) {
  return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(0).defined());
}

bool autograd_sees(const std::optional<at::Tensor>& t, bool grad_mode) {
  return t.has_value() && autograd_sees(*t, grad_mode);
}

// The op's autograd kernel (all devices). In Python it cost a no_grad CUDA call 6-8 us of host
// time on an H100's host (25-27 us a call against inference mode's 18-21, where autograd's key
// is not dispatched), entering Python only to find nothing to record.
at::Tensor sparse_conv2d_autograd(c10::DispatchKeySet keys, const at::Tensor& x,
                                  const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& values, c10::IntArrayRef weight_shape,
                                  const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                  int64_t groups, bool relu,
                                  const std::optional<at::Tensor>& residual) {
  const bool grad_mode = at::GradMode::is_enabled();
  if (autograd_sees(x, grad_mode) || autograd_sees(row_ptr, grad_mode) ||
      autograd_sees(col_idx, grad_mode) || autograd_sees(values, grad_mode) ||
      autograd_sees(bias, grad_mode) || autograd_sees(residual, grad_mode)) {
    std::optional<at::Tensor> y = record_natively(x, row_ptr, col_idx, values, weight_shape,
                                                  bias, stride, padding, dilation, groups,
                                                  relu, residual);
    if (y.has_value()) return *y;
    ++g_recorded_calls;
    return call_python(&g_recorder, "the autograd recorder", x, row_ptr, col_idx, values,
                       weight_shape, bias, stride, padding, dilation, groups, relu, residual);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("escoin::sparse_conv2d", "")
                             .typed<decltype(sparse_conv2d_cuda)>();  // (the schema's)
  at::AutoDispatchBelowAutograd below;
  return op.redispatch(keys & c10::after_autograd_keyset, x, row_ptr, col_idx, values,
                       weight_shape, bias, stride, padding, dilation, groups, relu, residual);
}

// ops.py, after its kernel ran a call: `call` (an escoin.PreparedCall) serves later calls with
// these tensors' contents and geometry (where call_key gives the call a key).
void remember(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
              const at::Tensor& values, std::vector<int64_t> weight_shape,
              std::vector<int64_t> stride, std::vector<int64_t> padding,
              std::vector<int64_t> dilation, int64_t groups, py::object call) {
  CallKey key;
  if (!call_key(x, row_ptr, col_idx, values, weight_shape, stride, padding, dilation, groups,
                &key)) {
    return;
  }
  {
    // Already there (a call whose bias or residual the fast path does not take comes here
    // every time): nothing to do.
    std::lock_guard<std::mutex> lock(g_mutex);
    auto found = g_calls->find(key);
    if (found != g_calls->end() && found->second.alive()) return;
  }
  Remembered entry;
  entry.call = prepared_call_of(call);
  entry.storages = {row_ptr.storage().getWeakStorageImpl(),
                    col_idx.storage().getWeakStorageImpl(),
                    values.storage().getWeakStorageImpl()};
  entry.owner = std::move(call);
  // Drop the calls of freed tensors and of earlier writes to these ones (their filters are
  // stale for good), so the map grows with the live (weight, geometry) pairs only.
  insert_purging(&g_mutex, g_calls, key, std::move(entry),
                 +[](const CallKey& k, const Remembered& e, const CallKey& added) {
                   return rewritten(k.csr.data(), added.csr.data(), 3) || !e.alive();
                 });
}

// Forgets every remembered call (escoin_torch.release_geometries frees their arrays).
void forget() {
  forget_training();
  std::unordered_map<CallKey, Remembered, CallKeyHash> dropped;
  std::lock_guard<std::mutex> lock(g_mutex);
  dropped.swap(*g_calls);
  // (dropped is destroyed after the lock is released: declared before it)
}

// Forgets every remembered call and pattern of a tensor whose storage is at `address`
// (ops.py calls it as such a tensor is freed: what they hold would otherwise stay in memory
// until the next insert purged it).
void forget_storage(uintptr_t address) {
  const auto* storage = reinterpret_cast<const c10::StorageImpl*>(address);
  forget_training_storage(storage);
  drop_storage(&g_mutex, g_calls, storage);
}

void set_api(py::capsule api) {
  const auto* table = static_cast<const escoin_api_t*>(api.get_pointer());
  // (Version 1 serves the calls run here; native_training.cpp needs version 2's entry.)
  TORCH_CHECK(table != nullptr && table->version >= 1,
              "escoin_torch._native: escoin's C API table is missing");
  g_api = table;
}

void set_python_kernel(py::object kernel) {
  // Leaked on purpose: called from kernels until the process ends.
  delete g_python_kernel;
  g_python_kernel = new py::object(std::move(kernel));
}

void set_recorder(py::object recorder) {
  delete g_recorder;  // (leaked on purpose, as the Python kernel)
  g_recorder = new py::object(std::move(recorder));
}

py::dict stats() {
  size_t remembered;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    remembered = g_calls->size();
  }
  py::dict out;  // (built after the lock: an allocation may run Python's collector)
  out["remembered"] = remembered;
  out["fast_calls"] = g_fast_calls.load();
  out["recorded_calls"] = g_recorded_calls.load();
  out["stream_handles"] = kStreamHandles;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(escoin, CUDA, m) {
  m.impl("sparse_conv2d", TORCH_FN(sparse_conv2d_cuda));
}

TORCH_LIBRARY_IMPL(escoin, Autograd, m) {
  m.impl("sparse_conv2d", TORCH_FN(sparse_conv2d_autograd));
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "escoin::sparse_conv2d's CUDA kernel in C++ for calls it has seen, and its autograd "
            "kernel (ops.py)";
  m.def("set_api", &set_api, "The core's entry table: escoin.c_api()");
  m.def("set_python_kernel", &set_python_kernel, "ops.py's CUDA kernel, for the other calls");
  m.def("set_recorder", &set_recorder, "ops.py's _recorded, for calls autograd must see");
  m.def("remember", &remember, "A prepared call for later calls with these tensors' contents");
  m.def("forget", &forget, "Forgets every remembered call");
  m.def("forget_storage", &forget_storage,
        "Forgets the calls and patterns of the tensors in the storage at this address");
  m.def("stats", &stats, "Remembered calls, calls run here, calls handed to _recorded");
  define_training(m);
  // (Lists for the int[] arguments: pybind11 has no caster for c10::IntArrayRef.)
  m.def(
      "sparse_conv2d_cuda",
      [](const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
         const at::Tensor& values, std::vector<int64_t> weight_shape,
         std::optional<at::Tensor> bias, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool relu,
         std::optional<at::Tensor> residual) {
        return sparse_conv2d_cuda(x, row_ptr, col_idx, values, weight_shape, bias, stride,
                                  padding, dilation, groups, relu, residual);
      },
      "The kernel, callable without dispatch (conv2d_with_filter's plain calls)", py::arg("x"),
      py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"), py::arg("weight_shape"),
      py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::arg("relu"), py::arg("residual") = py::none(),
      py::call_guard<py::gil_scoped_release>());
}
