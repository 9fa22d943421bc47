// native_calls.h -- what escoin_torch._native's two parts share: the key a call of the op is
// known by, a prepared call's fields as the core's CUDA entry takes them, and the core's entry
// table. native_kernel.cpp runs the calls it has seen (and is the op's autograd kernel);
// native_training.cpp records a training step's calls for autograd without Python.
#pragma once

#include <torch/extension.h>

#include <c10/core/impl/VirtualGuardImpl.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "escoin/escoin.h"

namespace escoin_native {

namespace py = pybind11;

// The core's entry table (escoin.c_api(), handed over by set_api); null until then.
extern const escoin_api_t* g_api;

// One CSR tensor's contents, by identity: which storage, where in it, how long, of which type
// (a contiguous tensor: strides need no place), which write.
struct ContentsId {
  const c10::StorageImpl* storage;
  int64_t offset, numel, version;
  c10::ScalarType dtype;
  bool same_memory(const ContentsId& o) const {
    return storage == o.storage && offset == o.offset && numel == o.numel && dtype == o.dtype;
  }
  bool operator==(const ContentsId& o) const { return same_memory(o) && version == o.version; }
};

// Whether the first `n` CSR tensors of `added` are in the memory of `known`'s and were written
// since: what was known of `known`'s contents is then stale for good.
inline bool rewritten(const ContentsId* known, const ContentsId* added, int n) {
  bool same_memory = true, same_contents = true;
  for (int i = 0; i < n; ++i) {
    same_memory &= known[i].same_memory(added[i]);
    same_contents &= known[i] == added[i];
  }
  return same_memory && !same_contents;
}

struct CallKey {
  std::array<ContentsId, 3> csr;  // row_ptr, col_idx, values
  std::array<int64_t, 4> x_shape, weight_shape;
  std::array<int64_t, 6> geometry;  // stride, padding, dilation (height, width each)
  int64_t groups;
  int device;
  c10::ScalarType dtype;  // x's, the values' and the output's
  bool operator==(const CallKey& o) const {
    return csr == o.csr && x_shape == o.x_shape && weight_shape == o.weight_shape &&
           geometry == o.geometry && groups == o.groups && device == o.device && dtype == o.dtype;
  }
};

struct CallKeyHash {
  size_t operator()(const CallKey& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the key's words
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    for (const ContentsId& c : k.csr) {
      mix(reinterpret_cast<uintptr_t>(c.storage));
      mix(uint64_t(c.offset));
      mix(uint64_t(c.numel));
      mix(uint64_t(c.version));
      mix(uint64_t(c.dtype));
    }
    for (int64_t v : k.x_shape) mix(uint64_t(v));
    for (int64_t v : k.weight_shape) mix(uint64_t(v));
    for (int64_t v : k.geometry) mix(uint64_t(v));
    mix(uint64_t(k.groups));
    mix(uint64_t(k.device));
    mix(uint64_t(k.dtype));
    return size_t(h);
  }
};

// What the core's CUDA entry needs beyond the call's tensors (escoin.PreparedCall's fields).
struct PreparedCall {
  escoin_conv_desc_t desc;
  escoin_dtype_t dtype;
  int device;
  const int64_t* row_ptr;
  const int32_t* offsets;
  const void* values;
  const void* tile_program;
  size_t workspace_bytes;
  std::array<int64_t, 4> output_shape;
  // The filter's generation in memory and the value it held when the call was prepared: the
  // filter's release_geometries (through escoin_torch or escoin itself) frees the arrays above
  // and moves it on, so a moved one means "stale, never launch".
  const int64_t* generation;
  int64_t prepared_generation;
  bool current() const {
    // (An atomic read: escoin's release_geometries writes the cell under its own lock.)
    return __atomic_load_n(generation, __ATOMIC_ACQUIRE) == prepared_generation;
  }
};

// Expired once any of the storages is freed: a new storage at a freed one's address never
// matches what was known of the old one.
inline bool any_expired(const std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>>& storages) {
  for (const auto& s : storages) {
    if (s.expired()) return true;
  }
  return false;
}

// c10::Stream::native_handle (the cudaStream_t of a CUDA stream) is recent; with a torch that
// lacks it every call runs the Python kernel, which reads the handle through torch._C.
template <typename S, typename = void>
struct HasNativeHandle : std::false_type {};
template <typename S>
struct HasNativeHandle<S, std::void_t<decltype(std::declval<const S&>().native_handle())>>
    : std::true_type {};
constexpr bool kStreamHandles = HasNativeHandle<c10::Stream>::value;

template <typename S>
inline void* current_stream_handle(const S& stream) {
  if constexpr (HasNativeHandle<S>::value) {
    return stream.native_handle();
  } else {
    return nullptr;
  }
}

inline bool contents_id(const at::Tensor& t, ContentsId* out) {
  if (!t.defined() || t.is_inference() || !t.has_storage() || !t.is_contiguous() ||
      t.is_neg()) {
    return false;  // (a neg-bit view shares its storage with the values it negates)
  }
  *out = ContentsId{t.storage().unsafeGetStorageImpl(), t.storage_offset(), t.numel(),
                    int64_t(t._version()), t.scalar_type()};
  return true;
}

// A pattern's key for x of `x_shape` in `dtype` on CUDA device `device`: the call key with the
// values left out (their contents zero), which native_training.cpp's patterns are known by.
inline bool pattern_key(c10::IntArrayRef x_shape, c10::ScalarType dtype, int device,
                        const at::Tensor& row_ptr, const at::Tensor& col_idx,
                        c10::IntArrayRef weight_shape, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                        CallKey* key) {
  if (x_shape.size() != 4 || weight_shape.size() != 4 || stride.size() != 2 ||
      padding.size() != 2 || dilation.size() != 2) {
    return false;
  }
  *key = CallKey{};
  if (!contents_id(row_ptr, &key->csr[0]) || !contents_id(col_idx, &key->csr[1])) return false;
  for (int i = 0; i < 4; ++i) {
    key->x_shape[i] = x_shape[i];
    key->weight_shape[i] = weight_shape[i];
  }
  for (int i = 0; i < 2; ++i) {
    key->geometry[i] = stride[i];
    key->geometry[2 + i] = padding[i];
    key->geometry[4 + i] = dilation[i];
  }
  key->groups = groups;
  key->device = device;
  key->dtype = dtype;
  return true;
}

inline bool call_key(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& values, c10::IntArrayRef weight_shape,
                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation, int64_t groups, CallKey* key) {
  // (x as the core reads it: contiguous NCHW, no neg bit, which the Python kernel resolves.)
  if (x.dim() != 4 || !x.is_cuda() || !x.is_contiguous() || x.is_neg()) return false;
  return pattern_key(x.sizes(), x.scalar_type(), x.get_device(), row_ptr, col_idx,
                     weight_shape, stride, padding, dilation, groups, key) &&
         contents_id(values, &key->csr[2]) && values.scalar_type() == key->dtype;
}

// A bias or residual the core can read as it is: contiguous (no neg bit), of `shape`, x's dtype
// and device.
inline bool plain_operand(const std::optional<at::Tensor>& t, const at::Tensor& x,
                   c10::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return true;
  return t->is_contiguous() && !t->is_neg() && t->sizes() == shape &&
         t->scalar_type() == x.scalar_type() && t->device() == x.device();
}

inline const void* address_of(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr() : nullptr;
}

// Moves out of `*map` (into `*dropped`) every entry `dead(key, entry)` names: the caller holds
// the map's lock and releases `*dropped` after letting it go (see insert_purging).
template <typename Map, typename Dead>
void move_out_dead(Map* map, std::vector<typename Map::mapped_type>* dropped, Dead dead) {
  for (auto it = map->begin(); it != map->end();) {
    if (dead(it->first, it->second)) {
      dropped->push_back(std::move(it->second));
      it = map->erase(it);
    } else {
      ++it;
    }
  }
}

// Puts `entry` into `*map` at `key` (replacing one there) and drops, under `*mutex`, every entry
// `dead` names dead beside the added key, so a map grows with its live entries only. Dropped
// entries release their Python objects after the lock is let go: a release can run Python code
// (a filter's finalizer), which may hand the GIL to a thread waiting for this lock.
template <typename Map, typename Entry>
void insert_purging(std::mutex* mutex, Map* map, typename Map::key_type key, Entry entry,
                    bool (*dead)(const typename Map::key_type&, const Entry&,
                                 const typename Map::key_type&)) {
  std::vector<Entry> dropped;  // (declared before the lock, so destroyed after its release)
  std::lock_guard<std::mutex> lock(*mutex);
  move_out_dead(map, &dropped,
                [&](const auto& k, const Entry& e) { return dead(k, e, key); });
  auto found = map->find(key);
  if (found != map->end()) dropped.push_back(std::move(found->second));
  (*map)[key] = std::move(entry);
}

// Drops, under `*mutex`, every entry of `*map` whose key names `storage` among its CSR tensors'
// (a key's `csr` array): that storage's tensor is being freed (forget_storage).
template <typename Map>
void drop_storage(std::mutex* mutex, Map* map, const c10::StorageImpl* storage) {
  std::vector<typename Map::mapped_type> dropped;  // (destroyed after the lock's release)
  std::lock_guard<std::mutex> lock(*mutex);
  move_out_dead(map, &dropped, [storage](const auto& key, const auto&) {
    for (const ContentsId& c : key.csr)
      if (c.storage == storage) return true;
    return false;
  });
}

// y's stream: torch's current stream on x's device (its cudaStream_t; null where torch lacks
// native_handle, and then no call is taken here).
inline void* current_stream_of(const at::Tensor& x) {
  c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
  return current_stream_handle(cuda.getStream(x.device()));
}

// The fields of an escoin.PreparedCall (its native_arguments()) as PreparedCall holds them;
// raises where escoin hands another form than this build expects.
PreparedCall prepared_call_of(const py::object& call);

// native_training.cpp: a call autograd must record, run and recorded here where its pattern
// and geometry are known (remember_pattern) and nothing else must see it; nullopt elsewhere.
std::optional<at::Tensor> record_natively(const at::Tensor& x, const at::Tensor& row_ptr,
                                          const at::Tensor& col_idx, const at::Tensor& values,
                                          c10::IntArrayRef weight_shape,
                                          const std::optional<at::Tensor>& bias,
                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                          c10::IntArrayRef dilation, int64_t groups, bool relu,
                                          const std::optional<at::Tensor>& residual);

// native_training.cpp's functions for Python (remember_pattern, ...), added to the module.
void define_training(py::module& m);

// Forgets native_training.cpp's patterns (escoin_torch.release_geometries frees their arrays).
void forget_training();

// Forgets native_training.cpp's patterns and transpositions of tensors in `storage`.
void forget_training_storage(const c10::StorageImpl* storage);

}  // namespace escoin_native
