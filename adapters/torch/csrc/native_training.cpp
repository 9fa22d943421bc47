// native_training.cpp -- a training step's calls of escoin::sparse_conv2d, recorded for autograd
// and differentiated in C++.
//
// A training step gives every sparse layer new values on the same pattern (row_ptr and col_idx
// stay the same tensors; escoin_torch.layer). Through ops.py each such call cost the host a
// Python autograd.Function, the Python kernel (argument checks, the filter cache, a prepare
// writing the program) and, in the backward, the Python gradients with a second such call for
// the input gradient: ~0.8 ms a layer, so that a ResNet-50 step at batch 32 on an H100 was bound
// by the host, not the GPU. Here a call whose pattern and geometry are known runs from the
// autograd kernel without Python: it writes the staged kernel's program of the new values on
// the current stream (the core's escoin_tile_program_write_weights, into memory from torch's
// caching allocator) and launches the core's CUDA entry; its backward does what ops.py's
// _gradients does, in the same torch operations.
//
// What is known comes from ops.py, which runs the step's first calls: remember_pattern (a
// SparseFilter.prepare_for_values call per pattern and input geometry, the forward's and the
// input gradient's) and remember_transposition (the input gradient's pattern, and where each
// stored value sits in the dense weight). A call is taken here only where nothing else must see
// it: CUDA tensors that are plain (no subclass, no functorch wrapper, no tangent), no dispatch
// mode or functorch transform active, contiguous x and values, and a bias and residual the
// core reads as they are. Its backward hands its work to ops.py (set_backward) where the
// gradients must themselves be differentiable (a double backward) or a part is not known.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "native_calls.h"

namespace escoin_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A pattern's call for one input geometry whose values come per launch
// (SparseFilter.prepare_for_values): its fields with no values nor program, and where each
// launch's program is written from (no layout: the staged kernel does not run the geometry).
struct PatternCall {
  PreparedCall call;
  const void* layout = nullptr;
  size_t layout_bytes = 0;
  const int64_t* slots = nullptr;
  int64_t count = 0;  // the pattern's nonzeros
};

struct KnownPattern {
  PatternCall call;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;  // row_ptr's, col_idx's
  // The Python call, which keeps the pattern's arrays alive (the GIL rules of
  // native_kernel.cpp's remembered calls).
  py::object owner;
  bool alive() const { return !any_expired(storages) && call.call.current(); }
};

// The input gradient's pattern for a forward pattern (ops.py's Transposition).
struct KnownTransposition {
  at::Tensor row_ptr, col_idx;  // the transposed pattern's
  at::Tensor order;             // int64: the forward entry each transposed entry takes
  at::Tensor flat_index;        // int64: each forward entry's place in the dense weight
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;  // the forward pattern's
};

// A forward pattern as a weight of one shape and group count (ops.py's _transpositions key:
// the same tensors read as another weight transpose otherwise).
struct PatternId {
  std::array<ContentsId, 2> csr;  // row_ptr, col_idx
  std::array<int64_t, 4> weight_shape;
  int64_t groups;
  bool operator==(const PatternId& o) const {
    return csr == o.csr && weight_shape == o.weight_shape && groups == o.groups;
  }
};

struct PatternIdHash {
  size_t operator()(const PatternId& p) const {
    CallKey key{};  // (the call key's hash over the same fields, the rest zero)
    key.csr[0] = p.csr[0];
    key.csr[1] = p.csr[1];
    key.weight_shape = p.weight_shape;
    key.groups = p.groups;
    return CallKeyHash()(key);
  }
};

// The id of a pattern (row_ptr, col_idx) as a weight of `weight_shape` in `groups` groups;
// false where a tensor cannot have one (contents_id).
bool pattern_id(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                c10::IntArrayRef weight_shape, int64_t groups, PatternId* out) {
  if (weight_shape.size() != 4 || !contents_id(row_ptr, &out->csr[0]) ||
      !contents_id(col_idx, &out->csr[1])) {
    return false;
  }
  std::copy(weight_shape.begin(), weight_shape.end(), out->weight_shape.begin());
  out->groups = groups;
  return true;
}

std::mutex g_mutex;
// Both maps are never destroyed (their Python objects may outlive the interpreter at exit).
auto* g_patterns = new std::unordered_map<CallKey, KnownPattern, CallKeyHash>();
auto* g_transpositions =
    new std::unordered_map<PatternId, KnownTransposition, PatternIdHash>();
py::object* g_backward = nullptr;  // ops.py's _backward_of_native_call
// On unless switched off (escoin_torch.set_native_training(False)), which sends every training
// call through ops.py's autograd.Function (the same kernels, more host time).
std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_native_forwards{0};   // calls recorded here
std::atomic<int64_t> g_native_backwards{0};  // their backwards computed here
std::atomic<int64_t> g_python_backwards{0};  // their backwards handed to ops.py

// The op's non-tensor arguments, as the backward needs them (saved as a list of ints).
struct TrainingGeometry {
  std::array<int64_t, 4> weight_shape;
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  bool relu;

  std::vector<int64_t> as_list() const {
    return {weight_shape[0], weight_shape[1], weight_shape[2], weight_shape[3], stride[0],
            stride[1],       padding[0],      padding[1],      dilation[0],     dilation[1],
            groups,          relu ? 1 : 0};
  }
  static TrainingGeometry of(const std::vector<int64_t>& v) {
    return {{v[0], v[1], v[2], v[3]}, {v[4], v[5]}, {v[6], v[7]}, {v[8], v[9]}, v[10],
            v[11] != 0};
  }
};

std::optional<PatternCall> find_pattern(const CallKey& key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_patterns->find(key);
  if (it == g_patterns->end() || !it->second.alive()) return std::nullopt;
  return it->second.call;
}

std::optional<KnownTransposition> find_transposition(const PatternId& id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_transpositions->find(id);
  if (it == g_transpositions->end() || any_expired(it->second.storages)) return std::nullopt;
  KnownTransposition found = it->second;
  return found;
}

// A tensor nothing else must see the call of: strided CUDA memory, no Python subclass, functorch
// wrapper, functional tensor or lazy conjugate or negation, and no forward-mode tangent.
bool plain_tensor(const at::Tensor& t) {
  if (!t.defined()) return true;
  static const c10::DispatchKeySet others{
      c10::DispatchKey::Python,          c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
      c10::DispatchKey::Functionalize,   c10::DispatchKey::Conjugate,
      c10::DispatchKey::Negative};
  return t.layout() == at::kStrided && t.is_cuda() && !t.key_set().has_any(others) &&
         !t._fw_grad(0).defined();
}

// Whether a dispatch mode or functorch transform is active, which must see each operation:
// the calls made here go to the core directly, so such a call, or backward, is left to ops.py.
bool intercepted() {
  return c10::impl::TorchDispatchModeTLS::stack_len() != 0 ||
         c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

void check(escoin_status_t status) {
  TORCH_CHECK_VALUE(status == ESCOIN_SUCCESS, "escoin: ", g_api->last_error());
}

// The convolution of x with `values` on a known pattern: the program of the values written on
// the current stream, then the launch. Output, workspace, program and the float32 values (for
// 16-bit ones) come from torch's caching allocator on that stream, so they are freed in its
// order and the call is legal inside CUDA graph capture.
at::Tensor launch_on_values(const PatternCall& c, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& bias, const at::Tensor& residual, bool relu) {
  const at::Tensor values32 = values.to(at::kFloat).contiguous();  // (itself if float32)
  at::Tensor y = at::empty(c.call.output_shape, x.options());
  at::Tensor workspace =
      at::empty({int64_t(c.call.workspace_bytes)}, x.options().dtype(at::kByte));
  void* stream = current_stream_of(x);
  at::Tensor program;
  if (c.layout != nullptr) {
    program = at::empty({int64_t(c.layout_bytes)}, x.options().dtype(at::kByte));
    check(g_api->tile_program_write_weights(program.data_ptr(), c.layout, c.layout_bytes,
                                            c.slots, values32.const_data_ptr<float>(), c.count,
                                            c.call.device, stream));
  }
  check(g_api->conv2d_forward_cuda(
      &c.call.desc, c.call.dtype, x.const_data_ptr(), c.call.row_ptr, c.call.offsets,
      values32.const_data_ptr(), program.defined() ? program.const_data_ptr() : nullptr,
      bias.defined() ? bias.const_data_ptr() : nullptr,
      residual.defined() ? residual.const_data_ptr() : nullptr, relu ? 1 : 0, y.data_ptr(),
      workspace.data_ptr(), c.call.workspace_bytes, c.call.device, stream));
  return y;
}

// ops.py's _gradients for a call recorded here: (x, values, bias, residual), each where asked.
using Gradients = std::array<at::Tensor, 4>;

Gradients python_gradients(const variable_list& saved, const TrainingGeometry& g,
                           const at::Tensor& grad, const std::array<bool, 4>& needs) {
  ++g_python_backwards;
  py::gil_scoped_acquire gil;
  TORCH_CHECK(g_backward != nullptr,
              "escoin_torch._native: ops.py's backward was not handed over (set_backward)");
  const at::Tensor& output = saved[4];
  auto list = [](const auto& a) { return std::vector<int64_t>(a.begin(), a.end()); };
  py::tuple result = (*g_backward)(
      saved[0], saved[1], saved[2], saved[3], output.defined() ? py::cast(output) : py::none(),
      list(g.weight_shape), list(g.stride), list(g.padding), list(g.dilation), g.groups,
      g.relu, grad, py::make_tuple(needs[0], needs[1], needs[2], needs[3]));
  Gradients out;
  for (size_t i = 0; i < 4; ++i) {
    if (!result[i].is_none()) out[i] = result[i].cast<at::Tensor>();
  }
  return out;
}

// The backward of ops.py's _gradients, where every part it needs is known: nullopt (nothing
// queued) elsewhere.
std::optional<Gradients> native_gradients(const variable_list& saved, const TrainingGeometry& g,
                                          at::Tensor grad, const std::array<bool, 4>& needs) {
  const at::Tensor &x = saved[0], &row_ptr = saved[1], &col_idx = saved[2],
                   &values = saved[3], &output = saved[4];
  if (!plain_tensor(grad) || grad.dim() != 4 || intercepted()) return std::nullopt;
  PatternId id;
  if (!pattern_id(row_ptr, col_idx, g.weight_shape, g.groups, &id)) return std::nullopt;
  std::optional<KnownTransposition> t = find_transposition(id);
  if (!t) return std::nullopt;
  // The input gradient: conv_transpose2d(grad, W) as a stride-1 sparse conv of the transposed
  // weight over grad spread by the stride (zeros between its elements) and padded (or
  // cropped) so that the output is exactly x's size, ops.py's _input_grad.
  const int64_t n = grad.size(0), m = grad.size(1), out_h = grad.size(2), out_w = grad.size(3);
  std::array<int64_t, 2> out_hw{out_h, out_w}, spread_hw, low, high, common;
  for (int a = 0; a < 2; ++a) {
    spread_hw[a] = (out_hw[a] - 1) * g.stride[a] + 1;
    low[a] = g.dilation[a] * (g.weight_shape[2 + a] - 1) - g.padding[a];
    high[a] = x.size(2 + a) - 1 - (out_hw[a] - 1) * g.stride[a] + g.padding[a];
    common[a] = std::max<int64_t>(0, low[a]);  // the symmetric part, padded by the kernel
  }
  const std::array<int64_t, 4> crop{low[1] - common[1], high[1] - common[1],
                                    low[0] - common[0], high[0] - common[0]};
  const std::array<int64_t, 4> padded_shape{n, m, spread_hw[0] + crop[2] + crop[3],
                                            spread_hw[1] + crop[0] + crop[1]};
  const std::array<int64_t, 4> flipped_shape{g.groups * g.weight_shape[1],
                                             g.weight_shape[0] / g.groups, g.weight_shape[2],
                                             g.weight_shape[3]};
  const std::array<int64_t, 2> unit{1, 1};
  std::optional<PatternCall> flipped;
  if (needs[0]) {
    CallKey key;
    if (!pattern_key(padded_shape, values.scalar_type(), x.get_device(), t->row_ptr,
                     t->col_idx, flipped_shape, unit, common, g.dilation, g.groups, &key)) {
      return std::nullopt;
    }
    flipped = find_pattern(key);
    if (!flipped || flipped->count != values.numel()) return std::nullopt;
  }
  if (g.relu) grad = grad * output.gt(0);
  grad = grad.contiguous();
  Gradients out;
  if (needs[0]) {
    at::Tensor spread = grad;
    if (g.stride[0] != 1 || g.stride[1] != 1) {
      spread = at::zeros({n, m, spread_hw[0], spread_hw[1]}, grad.options());
      spread.slice(2, 0, std::nullopt, g.stride[0])
          .slice(3, 0, std::nullopt, g.stride[1])
          .copy_(grad);
    }
    if (crop != std::array<int64_t, 4>{0, 0, 0, 0}) {
      spread = at::constant_pad_nd(spread, crop, 0);
    }
    out[0] = launch_on_values(*flipped, spread.contiguous(), values.index_select(0, t->order),
                              at::Tensor(), at::Tensor(), false);
  }
  if (needs[1]) {
    // The dense weight gradient (one cuDNN call, as torch.nn.grad.conv2d_weight makes it),
    // kept at the pattern's entries.
    at::Tensor weight = at::empty({1}, grad.options()).expand(g.weight_shape);
    auto dense = at::convolution_backward(grad, x, weight, std::nullopt, g.stride, g.padding,
                                          g.dilation, false, {0, 0}, g.groups,
                                          {false, true, false});
    out[1] = std::get<1>(dense).reshape(-1).index_select(0, t->flat_index);
  }
  if (needs[2]) out[2] = grad.sum({0, 2, 3});
  if (needs[3]) out[3] = grad;
  return out;
}

// The op's call as a C++ autograd function. bias and residual are optional arguments, which
// autograd leaves out of its inputs where absent: a gradient's edge is counted over the
// present ones (x 0, values 1, then bias and residual where given).
struct NativeSparseConv2d : public torch::autograd::Function<NativeSparseConv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            const TrainingGeometry& g, const PatternCall& call) {
    const at::Tensor b = bias.value_or(at::Tensor()), r = residual.value_or(at::Tensor());
    at::Tensor y = launch_on_values(call, x, values, b, r, g.relu);
    // What ops.py's _save saves, in its order (the output only for the ReLU's mask): a
    // forward that non-reentrant checkpointing runs again in the backward may take the other
    // path, and hands its saved tensors to this node's slots by position.
    ctx->save_for_backward({x, row_ptr, col_idx, values, g.relu ? y : at::Tensor()});
    ctx->saved_data["geometry"] = g.as_list();
    ctx->saved_data["has_bias"] = b.defined();
    ctx->saved_data["has_residual"] = r.defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const TrainingGeometry g =
        TrainingGeometry::of(ctx->saved_data["geometry"].toIntVector());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const std::array<bool, 4> needs{
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(2),
        has_residual && ctx->needs_input_grad(has_bias ? 3 : 2)};
    std::optional<Gradients> out;
    // A backward that records its own graph (create_graph) needs ops.py's differentiable one.
    if (!at::GradMode::is_enabled()) out = native_gradients(saved, g, grads[0], needs);
    if (out) {
      ++g_native_backwards;
    } else {
      out = python_gradients(saved, g, grads[0], needs);
    }
    // One per forward argument: x, values, bias, residual; none for the pattern and the rest.
    return {(*out)[0], (*out)[1], (*out)[2], (*out)[3], at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// ops.py, after its kernel ran a training call on device values: the pattern's call for this
// input geometry (prepare(): a SparseFilter.prepare_for_values call), asked for only where
// none is known.
void remember_pattern(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      std::vector<int64_t> weight_shape, std::vector<int64_t> stride,
                      std::vector<int64_t> padding, std::vector<int64_t> dilation,
                      int64_t groups, const py::object& prepare) {
  CallKey key;
  if (!g_enabled.load(std::memory_order_relaxed) || !x.is_cuda() ||
      !pattern_key(x.sizes(), x.scalar_type(), x.get_device(), row_ptr, col_idx, weight_shape,
                   stride, padding, dilation, groups, &key) ||
      find_pattern(key)) {
    return;
  }
  py::object call = prepare();
  KnownPattern entry;
  entry.call.call = prepared_call_of(call);
  py::tuple layout = call.attr("native_program_layout")();
  TORCH_CHECK(layout.size() == 4,
              "escoin_torch._native: escoin.PreparedCall.native_program_layout() has another "
              "form than this build expects");
  entry.call.layout = reinterpret_cast<const void*>(layout[0].cast<uintptr_t>());
  entry.call.layout_bytes = layout[1].cast<size_t>();
  entry.call.slots = reinterpret_cast<const int64_t*>(layout[2].cast<uintptr_t>());
  entry.call.count = layout[3].cast<int64_t>();
  entry.storages = {row_ptr.storage().getWeakStorageImpl(),
                    col_idx.storage().getWeakStorageImpl()};
  entry.owner = std::move(call);
  // Drop the patterns of freed tensors, of earlier writes to these ones and of released
  // geometries, so the map grows with the live (pattern, geometry) pairs only.
  insert_purging(&g_mutex, g_patterns, key, std::move(entry),
                 +[](const CallKey& k, const KnownPattern& e, const CallKey& added) {
                   // (a pattern key's values are left out: row_ptr and col_idx decide)
                   return rewritten(k.csr.data(), added.csr.data(), 2) || !e.alive();
                 });
}

// ops.py, after a backward it computed: the input gradient's pattern for this forward pattern.
void remember_transposition(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            std::vector<int64_t> weight_shape, int64_t groups,
                            const at::Tensor& flipped_row_ptr, const at::Tensor& flipped_col_idx,
                            const at::Tensor& order, const at::Tensor& flat_index) {
  PatternId id;
  if (!g_enabled.load(std::memory_order_relaxed) || !row_ptr.is_cuda() ||
      !pattern_id(row_ptr, col_idx, weight_shape, groups, &id) || find_transposition(id)) {
    return;
  }
  TORCH_CHECK_VALUE(order.scalar_type() == at::kLong && flat_index.scalar_type() == at::kLong &&
                        order.numel() == col_idx.numel() &&
                        flat_index.numel() == col_idx.numel() &&
                        order.device() == row_ptr.device() &&
                        flat_index.device() == row_ptr.device(),
                    "escoin_torch._native: order and flat_index must be int64, one per nonzero, "
                    "on the pattern's device");
  KnownTransposition entry{flipped_row_ptr, flipped_col_idx, order.contiguous(),
                           flat_index.contiguous(),
                           {row_ptr.storage().getWeakStorageImpl(),
                            col_idx.storage().getWeakStorageImpl()}};
  insert_purging(&g_mutex, g_transpositions, id, std::move(entry),
                 +[](const PatternId& k, const KnownTransposition& e, const PatternId& added) {
                   return rewritten(k.csr.data(), added.csr.data(), 2) ||
                          any_expired(e.storages);
                 });
}

void set_backward(py::object backward) {
  delete g_backward;  // (leaked on purpose, as native_kernel.cpp's Python kernel)
  g_backward = new py::object(std::move(backward));
}

py::dict training_stats() {
  size_t patterns, transpositions;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    patterns = g_patterns->size();
    transpositions = g_transpositions->size();
  }
  py::dict out;  // (built after the lock: an allocation may run Python's collector)
  out["patterns"] = patterns;
  out["transpositions"] = transpositions;
  out["native_forwards"] = g_native_forwards.load();
  out["native_backwards"] = g_native_backwards.load();
  out["python_backwards"] = g_python_backwards.load();
  out["enabled"] = g_enabled.load();
  return out;
}

}  // namespace

std::optional<at::Tensor> record_natively(const at::Tensor& x, const at::Tensor& row_ptr,
                                          const at::Tensor& col_idx, const at::Tensor& values,
                                          c10::IntArrayRef weight_shape,
                                          const std::optional<at::Tensor>& bias,
                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                          c10::IntArrayRef dilation, int64_t groups, bool relu,
                                          const std::optional<at::Tensor>& residual) {
  if (!g_enabled.load(std::memory_order_relaxed) || !kStreamHandles || g_api == nullptr ||
      g_api->version < 2) {
    return std::nullopt;
  }
  if (!plain_tensor(x) || !plain_tensor(values) || !plain_tensor(bias.value_or(at::Tensor())) ||
      !plain_tensor(residual.value_or(at::Tensor())) || intercepted()) {
    return std::nullopt;
  }
  CallKey key;
  if (!call_key(x, row_ptr, col_idx, values, weight_shape, stride, padding, dilation, groups,
                &key) ||
      values.device() != x.device() || values.dim() != 1 ||
      values.numel() != col_idx.numel()) {
    return std::nullopt;
  }
  key.csr[2] = ContentsId{};  // (the pattern's key: its values left out)
  std::optional<PatternCall> found = find_pattern(key);
  if (!found || found->count != values.numel() || found->count == 0 ||
      !plain_operand(bias, x, {weight_shape[0]}) ||
      !plain_operand(residual, x, found->call.output_shape)) {
    return std::nullopt;
  }
  ++g_native_forwards;
  TrainingGeometry g{{weight_shape[0], weight_shape[1], weight_shape[2], weight_shape[3]},
                     {stride[0], stride[1]},
                     {padding[0], padding[1]},
                     {dilation[0], dilation[1]},
                     groups,
                     relu};
  // (Absent ones as nullopt: an undefined tensor among autograd's inputs has no device.)
  auto present = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t : std::nullopt;
  };
  return NativeSparseConv2d::apply(x, values, present(bias), present(residual), row_ptr,
                                   col_idx, g, *found);
}

void forget_training() {
  std::unordered_map<CallKey, KnownPattern, CallKeyHash> patterns;
  std::unordered_map<PatternId, KnownTransposition, PatternIdHash> transpositions;
  std::lock_guard<std::mutex> lock(g_mutex);
  patterns.swap(*g_patterns);
  transpositions.swap(*g_transpositions);
  // (both are destroyed after the lock is released: declared before it)
}

void forget_training_storage(const c10::StorageImpl* storage) {
  drop_storage(&g_mutex, g_patterns, storage);
  drop_storage(&g_mutex, g_transpositions, storage);
}

void define_training(py::module& m) {
  m.def("remember_pattern", &remember_pattern,
        "A pattern's call for one input geometry (prepare(): SparseFilter.prepare_for_values), "
        "for training calls on new values");
  m.def("remember_transposition", &remember_transposition,
        "The input gradient's pattern for a forward pattern, and each entry's dense index");
  m.def("set_backward", &set_backward, "ops.py's backward, for what is not computed here");
  m.def(
      "set_training_calls", [](bool on) { g_enabled = on; },
      "Whether training calls on known patterns are recorded here (else by ops.py)");
  m.def("training_stats", &training_stats,
        "Known patterns and transpositions; calls recorded, backwards computed here or not");
}

}  // namespace escoin_native
