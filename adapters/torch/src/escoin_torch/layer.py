"""``SparseConv2d``: an ``nn.Conv2d`` that runs inference from a compressed copy of its weight.

It *is* an ``nn.Conv2d`` (same constructor, parameters and ``state_dict`` keys), so checkpoints,
optimisers, pruning utilities and code that checks ``isinstance(m, nn.Conv2d)`` keep working. The
dense ``weight`` stays the source of truth; the CSR copy is derived from it, rebuilt on the weight's
device whenever the weight changes, and never saved.

One CSR is kept per device the layer computes on: ``.to(device)`` builds one for the new weight at
once (where the layer had one), and replicas that share this module's state (``nn.DataParallel`` /
``torch.nn.parallel.replicate``) each keep theirs. The per-device map is filled under a lock, so
threads (DataParallel's, or a server's) may call one layer concurrently.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from escoin_torch import csr as csr_lib
from escoin_torch._cache import TensorStamp
from escoin_torch.csr import CSRWeight, host_numpy
from escoin_torch.eager import EagerCalls
from escoin_torch.ops import (PreparedFilter, conv2d_with_filter, filter_of, has_kernels_for,
                              training_values, transformed)

__all__ = ["SparseConv2d", "folded", "has_hooks", "pruned_names", "refresh_csrs"]

Path = Literal["sparse", "dense"]
_IntOrPair = Union[int, Tuple[int, int]]


@dataclass
class _Compressed:
    csr: CSRWeight
    flat_index: torch.Tensor  # where each stored value sits in weight.reshape(-1)
    stamp: TensorStamp        # the weight contents it was built from
    # For a CPU weight, the escoin filter csr was compressed through (csr holds copies of its
    # arrays): plain inference calls hand it to the kernel directly (ops.conv2d_with_filter).
    # None on a GPU, where the host copy would only take memory.
    host_filter: Optional[PreparedFilter]
    # Plain eager inference calls, prepared per input shape (escoin_torch.eager).
    eager: EagerCalls = field(default_factory=EagerCalls)


class SparseConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` computed by escoin from the CSR of its (pruned) weight.

    Which path runs:
      * training mode: dense ``F.conv2d`` (fast backward, weights change every step), unless
        ``sparse_training=True``, which runs the sparse op and trains only the stored nonzeros;
      * eval mode: ``inference_path`` -- ``"sparse"`` by default, ``"dense"`` where
        :func:`escoin_torch.calibrate` measured dense to be faster.

    ``relu=True`` fuses a ReLU into the convolution (on both paths, so they stay comparable).

    The CSR is rebuilt lazily when the weight's memory or version counter changes (a cheap check
    per call, not a recompression); where the changed weight keeps the CSR's pattern (an
    optimiser step of sparse training) only the values are gathered again, on the weight's
    device, and escoin's filters follow with the pattern's offsets and programs reused. Under
    ``torch.compile`` that check cannot be traced: the CSR in use is the one built before
    compiling (by :meth:`from_dense`, :func:`escoin_torch.sparsify` or one eager forward);
    after changing weights of a compiled model call :meth:`refresh_csr` (or run one eager
    forward) before using it again.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: Union[str, _IntOrPair] = 0,
                 dilation: _IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None, *,
                 relu: bool = False, sparse_training: bool = False,
                 inference_path: Path = "sparse") -> None:
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only (escoin pads with "
                             f"zeros inside the kernel), got {padding_mode!r}; keep this layer "
                             "an nn.Conv2d")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.relu = relu
        self.sparse_training = sparse_training
        self._compressed: Dict[torch.device, _Compressed] = {}
        self._csr_lock = threading.Lock()
        self.inference_path = inference_path

    @property
    def inference_path(self) -> Path:
        """``"sparse"`` or ``"dense"``: how eval mode computes (``calibrate`` sets it)."""
        return self._inference_path

    @inference_path.setter
    def inference_path(self, path: Path) -> None:
        if path not in ("sparse", "dense"):
            raise ValueError(f"inference_path must be 'sparse' or 'dense', got {path!r}")
        self._inference_path = path

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, relu: Optional[bool] = None,
                   sparse_training: Optional[bool] = None,
                   inference_path: Optional[Path] = None) -> "SparseConv2d":
        """A SparseConv2d computing what ``conv`` computes, sharing its parameters.

        The Parameter objects are shared (not copied), so optimiser state and memory stay as
        they were. A ``torch.nn.utils.prune`` reparametrisation is folded instead: the new layer
        owns a plain ``weight`` equal to ``weight_orig * weight_mask``. Hooks are copied (except
        pruning's), as are the training flag; the CSR is built right away. ``relu``,
        ``sparse_training`` and ``inference_path`` left out are ``conv``'s where it is a
        SparseConv2d, else False, False and ``"sparse"``.
        """
        if type(conv) is not nn.Conv2d and not isinstance(conv, SparseConv2d):
            raise TypeError(f"from_dense converts an nn.Conv2d, got {type(conv).__name__} (a "
                            "subclass may compute something else in forward)")
        source = conv if isinstance(conv, SparseConv2d) else None
        relu = (source is not None and source.relu) if relu is None else relu
        if sparse_training is None:
            sparse_training = source is not None and source.sparse_training
        if inference_path is None:
            inference_path = "sparse" if source is None else source.inference_path
        layer = cls(in_channels=conv.in_channels, out_channels=conv.out_channels,
                    kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device="meta", relu=relu,
                    sparse_training=sparse_training, inference_path=inference_path)
        pruned = pruned_names(conv)
        for name in ("weight", "bias"):
            value = folded(conv, name)
            if name in pruned:
                value = nn.Parameter(value.detach(),
                                     requires_grad=getattr(conv, name + "_orig").requires_grad)
            setattr(layer, name, value)
        _copy_hooks(conv, layer)
        layer.train(conv.training)
        if has_kernels_for(layer.weight):
            layer.refresh_csr()
        return layer

    @property
    def density(self) -> float:
        """Fraction of nonzero weights (what the sparse path's cost is proportional to)."""
        return float(torch.count_nonzero(self.weight.detach())) / max(1, self.weight.numel())

    @property
    def csr(self) -> CSRWeight:
        """The CSR of the current weight on its device, compressed only where the weight was
        replaced or written in place since (as a forward does)."""
        return self._current().csr

    def refresh_csr(self) -> CSRWeight:
        """Compresses the current weight again and returns its CSR (a CSR per device is kept:
        see the module docstring). Forwards recompress by themselves when the weight is
        replaced or written in place, but not after writes the version counter does not see
        (through ``.data`` or NumPy, or by the replay of a CUDA graph that writes the weight:
        a captured training step gathers its values inside the graph, but an inference graph
        keeps the values it was captured with): call this after those, and capture inference
        graphs again. The CSR is derived from the
        weight: change the weight, not the CSR (eager CPU inference computes from the layer's
        own escoin filter, which writes into these tensors do not reach)."""
        return self._current(again=True).csr

    def _current(self, again: bool = False) -> _Compressed:
        """The compressed state of the current weight (compressed again if `again`); one object,
        so that ``csr`` and ``flat_index`` always come from the same build even when other
        threads rebuild."""
        weight = self.weight
        with self._csr_lock:
            state = self._compressed.get(weight.device)
        if not again and state is not None and state.stamp.matches(weight):
            return state
        state = self._build(weight, None if again else state)
        self._keep(weight.device, state)
        return state

    # Run as plain Python under torch.compile too: where a compiled forward falls back to eager
    # (torch.compile's default mode, a layer with no CSR yet), the compiler would otherwise
    # trace into escoin's host code (NumPy buffers), which it cannot.
    @torch.compiler.disable
    def _build(self, weight: torch.Tensor, previous: Optional[_Compressed]) -> _Compressed:
        """The state of `weight`: `previous`'s pattern with the new values where the weight kept
        it, else compressed anew. Built outside the lock: compression is a host round trip, and
        replicas on other devices (which share the lock) should not wait for it. Two threads
        missing at once both build the same CSR; either result is correct. Built as normal
        tensors under torch.inference_mode too (a validation pass between training steps): the
        CSR serves the training forwards after it, which save flat_index for the backward."""
        with torch.inference_mode(False):
            refreshed = None if previous is None else _same_pattern(previous, weight)
            if refreshed is not None:
                return refreshed
            csr, host_filter = csr_lib.compress(weight, self.groups)
            return _Compressed(csr, csr.flat_index(), TensorStamp(weight),
                               PreparedFilter(host_filter) if weight.device.type == "cpu"
                               else None)

    def _keep(self, device: torch.device, state: _Compressed) -> None:
        """Makes `state` the CSR of the weight on `device`."""
        with self._csr_lock:
            for old in [d for d, s in self._compressed.items() if s.stamp.expired]:
                del self._compressed[old]  # e.g. a DataParallel replica's weight that died
            self._compressed[device] = state
        # (for _before_optimizer_step: a weight whose CSR follows its version counter)
        self.weight._escoin_compressed = True

    @property
    def runs_sparse(self) -> bool:
        """Whether forward runs escoin (sparse_forward) in the layer's current mode."""
        return self.sparse_training if self.training else self.inference_path == "sparse"

    def forward(self, input: torch.Tensor,  # (nn.Conv2d's name: callers may pass it by name)
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The convolution, plus ``residual`` (a tensor of the output's shape, e.g. a residual
        block's shortcut) if given, then the ReLU if the layer has one."""
        if isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: the layer is a leaf of the graph, as nn.Conv2d is (its
            # CSR cannot be built from a proxy), called as a module when the graph runs.
            tracer = input.tracer
            args = (input,) if residual is None else (input, residual)
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})
        path = self.sparse_forward if self.runs_sparse else self.dense_forward
        return path(input) if residual is None else path(input, residual)

    def dense_forward(self, x: torch.Tensor,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What ``nn.Conv2d`` computes (plus the residual and the optional ReLU)."""
        y = self._conv_forward(x, self.weight, self.bias)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def sparse_forward(self, x: torch.Tensor,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The escoin path, the residual and the ReLU in its epilogue; gradients reach the
        weight's stored nonzeros, the input, the bias and the residual."""
        if torch.compiler.is_compiling():  # (the compiler cannot trace transformed())
            state = self._compressed.get(self.weight.device)
            if state is None:
                raise RuntimeError("SparseConv2d has no CSR for its weight on "
                                   f"{self.weight.device} yet; build it before torch.compile "
                                   "or torch.export with layer.refresh_csr() or one eager "
                                   "forward")
        elif transformed(self.weight):
            return self._transformed_forward(x, residual)
        else:
            state = self._current()
            y = state.eager.forward(self, x, residual)
            if y is not None:
                return y
        csr = state.csr
        training = torch.is_grad_enabled() and self.weight.requires_grad
        # The values gathered from the weight itself: by a training step compiled or captured
        # in a CUDA graph (the optimiser's steps write the weight in place between calls that
        # run no eager stamp check, or no host code at all between replays: each call computes
        # with the weight the last step left), and from a weight carrying a forward-mode
        # tangent (a dual tensor, e.g. through functional_call), which the gather carries.
        in_graph = training and (torch.compiler.is_compiling() or (
            self.weight.is_cuda and torch.cuda.is_current_stream_capturing()))
        if in_graph or (forward_ad._current_level >= 0 and
                        forward_ad.unpack_dual(self.weight).tangent is not None):
            csr = csr._replace(values=self.weight.reshape(-1)[state.flat_index])
        elif training:
            # (The plain form where no functorch transform is active: torch binds the
            # arguments of a Function with a setup_context against its forward's signature on
            # every call.)
            attach = (_AttachToWeight if torch._C._are_functorch_transforms_active()
                      else _AttachToWeightPlain)
            csr = csr._replace(values=attach.apply(csr.values, self.weight, state.flat_index))
        # A sparse-training layer's forward that records no gradient (reentrant checkpointing's
        # first pass, a look at the outputs under no_grad between steps) has a step's values,
        # new after each optimiser step: on a GPU it computes with them where they are, as a
        # training call does, not with a filter of host values (a synchronisation a layer and
        # step).
        step_values = not training and self.training and not torch.compiler.is_compiling()
        with training_values() if step_values else contextlib.nullcontext():
            y = conv2d_with_filter(x, csr, state.host_filter, self.bias, self.stride,
                                   self.padding, self.dilation, self.relu, residual)
        # Only an inference call is remembered: the fast path takes no call that records a
        # gradient, and a training step's state (new values each step) would prepare a call of
        # host values for nothing, where the C++ training path has already run this one on the
        # device's values.
        if not training and not self.training and not torch.compiler.is_compiling():
            state.eager.remember(self, x, lambda: state.host_filter or filter_of(state.csr))
        return y

    def _transformed_forward(self, x: torch.Tensor,
                             residual: Optional[torch.Tensor]) -> torch.Tensor:
        """sparse_forward where a torch.func transform wraps the weight (torch.func.functional_call
        under grad or vmap: per-sample gradients): a wrapped tensor cannot be compressed on the
        host, so its values are gathered at the pattern of the CSR the layer built from its own
        weight, which must hold every nonzero of it. Where there is no such CSR yet, where the
        transform maps the weight itself (vmap over weights) or where the weight has a nonzero
        outside that pattern, the layer runs dense: exact, and differentiable as nn.Conv2d is.
        Each call's escoin filter (and each backward's, for the transpose) is the pattern's first
        one with the gathered values, not a new filter: on a GPU prepared on the values there,
        on the CPU escoin's with_values."""
        weight = self.weight
        state = self._compressed.get(weight.device)
        if state is None or weight.dtype != state.csr.values.dtype or _mapped(weight):
            return self.dense_forward(x, residual)
        flat = weight.reshape(-1)
        if bool(flat.index_fill(0, state.flat_index, 0).any()):
            return self.dense_forward(x, residual)
        csr = state.csr._replace(values=flat[state.flat_index])
        return conv2d_with_filter(x, csr, None, self.bias, self.stride, self.padding,
                                  self.dilation, self.relu, residual)

    def _apply(self, fn: Any, recurse: bool = True) -> "SparseConv2d":
        # .to()/.cuda()/.half() replace the weight. A new map (not .clear()): replicas sharing
        # the old one keep theirs.
        compressed = bool(self._compressed)
        self._compressed = {}
        result = super()._apply(fn, recurse)
        self._compress_again(compressed)
        return result

    def train(self, mode: bool = True) -> "SparseConv2d":
        # Leaving training: the weight may have changed where its version counter does not show
        # it (optimisers and EMA code that write through .data), so it is compressed again.
        leaving = self.training and not mode
        result = super().train(mode)
        if leaving:
            self._compress_again(bool(self._compressed))
        return result

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # load_state_dict writes the weight in place: a compiled model's forwards would not see
        # it (they do not trace the stamp check), so the layer compresses it now.
        super()._load_from_state_dict(*args, **kwargs)
        self._compress_again(bool(self._compressed))

    def _compress_again(self, compressed: bool) -> None:
        """Where the layer had a CSR (`compressed`), one for its current weight now: a model
        moved, copied or put back in eval mode after sparsify can then be compiled or exported
        at once (tracing cannot compress). Other layers compress on their first sparse forward."""
        if compressed and has_kernels_for(self.weight):
            self.refresh_csr()

    def __getstate__(self) -> Dict[str, Any]:
        # Copies and pickles compress their own weight (the stamps refer to this one) and get a
        # lock of their own (a lock can be neither copied nor pickled).
        state = dict(super().__getstate__())
        state["_compressed"] = {}
        state["_was_compressed"] = bool(self._compressed)
        state.pop("_csr_lock", None)
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A new weight Parameter (layer.weight = nn.Parameter(...)) is compressed at once where
        # the layer had a CSR, so that a model compiled or exported next computes with it
        # (tracing cannot compress). The same Parameter put back, as torch.func's
        # functional_call does, finds its CSR current: nothing is derived again.
        if name == "weight" and isinstance(value, nn.Parameter) and \
                self.__dict__.get("_compressed") and not torch.compiler.is_compiling() and \
                has_kernels_for(value):
            self._current()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        compressed = bool(state.pop("_was_compressed", False))
        super().__setstate__(state)
        if not isinstance(self.__dict__.get("_compressed"), dict):
            self._compressed = {}  # pickles of older versions stored None
        if "_inference_path" not in self.__dict__:  # pickles from before it was a property
            self._inference_path = self.__dict__.pop("inference_path", "sparse")
        self._csr_lock = threading.Lock()
        self._compress_again(compressed)

    def extra_repr(self) -> str:
        extras = [f"relu={self.relu}"] if self.relu else []
        if self.sparse_training:
            extras.append("sparse_training=True")
        if self.inference_path != "sparse":
            extras.append(f"inference_path={self.inference_path!r}")
        return ", ".join([super().extra_repr()] + extras)


class _PatternCheck(NamedTuple):
    """A changed weight gathered at its CSR's pattern, and the counts that say whether that
    gather is the CSR compressing the weight would give (_same_pattern)."""

    state: _Compressed
    weight: torch.Tensor
    values: torch.Tensor  # weight.reshape(-1)[state.flat_index]
    # On the weight's device: the weight's nonzeros and the gathered ones, then, where asked
    # for, how many gathered values differ from the CSR's
    counts: torch.Tensor

    def holds(self, counts: List[int]) -> bool:
        return counts[:2] == [self.state.csr.nnz] * 2

    @staticmethod
    def unchanged(counts: List[int]) -> bool:
        """Whether the counts say no value differs from the CSR's (where they were compared)."""
        return len(counts) == 3 and counts[2] == 0

    def refreshed(self) -> _Compressed:
        """The new state: the pattern's own tensors and the gathered values. The unchanged
        row_ptr and col_idx tensors let the op derive the new filter from the last one's
        pattern (ops._filter)."""
        state, values = self.state, self.values
        host_filter = (None if state.host_filter is None else
                       PreparedFilter(state.host_filter.filt.with_values(host_numpy(values))))
        return _Compressed(state.csr._replace(values=values), state.flat_index,
                           TensorStamp(self.weight), host_filter)


def _check_pattern(state: _Compressed, weight: torch.Tensor,
                   compare: bool = False) -> Optional[_PatternCheck]:
    """The check, queued on the weight's device (nothing waits for it); None where the weight
    cannot have the state's pattern (another shape or dtype put in its place). `compare` also
    counts the gathered values that differ from the CSR's (a NaN counts as differing)."""
    if tuple(weight.shape) != state.csr.shape or weight.dtype != state.csr.values.dtype:
        return None
    flat = weight.detach().reshape(-1)
    values = flat[state.flat_index]
    # Escoin stores w where w != 0 (a NaN too), as count_nonzero counts: every value at the
    # pattern is stored and the weight has no other, so the stored set is the pattern.
    counts = [torch.count_nonzero(flat), torch.count_nonzero(values)]
    if compare:
        counts.append(torch.count_nonzero(values != state.csr.values))
    return _PatternCheck(state, weight, values, torch.stack(counts))


def _same_pattern(state: _Compressed, weight: torch.Tensor) -> Optional[_Compressed]:
    """Where the weight's nonzeros are exactly those of `state`'s CSR (what an optimiser step of
    sparse training leaves), the CSR compressing it would give, from the pattern's own tensors
    and a gather of the new values: one pass over the weight and one synchronisation in place
    of compressing on the host. Elsewhere (weights pruned or grown, a weight of another shape or
    dtype put in its place) None."""
    check = _check_pattern(state, weight)
    return check.refreshed() if check is not None and check.holds(check.counts.tolist()) else None


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Every optimiser's step, registered once for all (torch.optim's global pre-step hook):
    marks the weights it is about to step that a SparseConv2d compressed as written. Fused
    optimisers (``fused=True``) write parameters in place without bumping their version
    counters, which is how a layer sees a weight change: the CSR kept the old values, silently.
    Marked before the step, not after it: torch runs an optimiser's own post-step hooks
    (refresh_csrs, in the sparse-training recipe) before the global ones, and they must see the
    write, or each layer's next forward would check its pattern again."""
    stepped = [p for group in optimizer.param_groups for p in group["params"]
               if p.grad is not None and getattr(p, "_escoin_compressed", False)]
    if stepped:
        torch.autograd.graph.increment_version(stepped)


register_optimizer_step_pre_hook(_before_optimizer_step)


def refresh_csrs(module: nn.Module, unseen_writes: bool = False) -> int:
    """Brings the CSR of every :class:`SparseConv2d` in `module` that has one up to date with
    its weight, with one synchronisation per device for all the layers whose weights kept their
    pattern, where each layer's forward would check its own (one synchronisation a layer, which
    makes the host wait for the GPU's queue before each layer). For sparse training on a GPU:
    call it after each optimiser step, e.g.
    ``optimizer.register_step_post_hook(lambda *_: escoin_torch.refresh_csrs(model))``.
    Layers whose weights were pruned, grown or replaced compress again, as their forwards would
    have; layers whose next forward runs dense (training without sparse_training, or
    inference_path "dense") are left to it. A layer knows its weight changed by its version
    counter; ``unseen_writes=True`` also checks the layers whose counters say unchanged, after
    writes that bypass them (``torch.distributed`` collectives into the parameters,
    ``torch.nn.utils.vector_to_parameters``, ``.data`` or NumPy). Returns the number of layers
    whose CSR was compressed again or took new values."""
    checks: List[Tuple[SparseConv2d, _PatternCheck]] = []
    refreshed = 0
    for layer in module.modules():
        if not isinstance(layer, SparseConv2d) or not layer.runs_sparse \
                or transformed(layer.weight):
            continue
        weight = layer.weight
        with layer._csr_lock:
            state = layer._compressed.get(weight.device)
        stamped = state is not None and state.stamp.matches(weight)
        if state is None or (stamped and not unseen_writes):
            continue
        # (Where the counter says unchanged, an unseen write may have left the values as they
        # were: compared, so that such a layer keeps its state and is not counted.)
        check = _check_pattern(state, weight, compare=stamped)
        if check is None:
            layer._current(again=True)
            refreshed += 1
        else:
            checks.append((layer, check))
    for device in {check.counts.device for _, check in checks}:
        mine = [(layer, check) for layer, check in checks if check.counts.device == device]
        # (One transfer for the device's layers: their counts of two or three, end to end.)
        counts, start = torch.cat([check.counts for _, check in mine]).tolist(), 0
        for layer, check in mine:
            found = counts[start:start + len(check.counts)]
            start += len(found)
            if not check.holds(found):
                layer._current(again=True)
            elif check.unchanged(found):
                continue
            else:
                layer._keep(check.weight.device, check.refreshed())
            refreshed += 1
    return refreshed


class _AttachToWeight(torch.autograd.Function):
    """Returns the cached CSR values unchanged, but routes their gradient into the dense weight.

    Gathering ``weight.reshape(-1)[flat_index]`` on every call would work too, but it creates new
    values each call and so a new escoin filter each call (derived from the pattern's: a copy
    of the values on the CPU, a program written on a GPU). The cached values equal that gather
    because the CSR follows every change of the weight.

    Under torch.func's transforms (vmap over a layer whose weight requires a gradient, jacfwd,
    hessian) torch derives the vmap rule from forward and backward, and the forward-mode
    tangent is the weight's tangent gathered the same way.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(values: torch.Tensor, weight: torch.Tensor,
                flat_index: torch.Tensor) -> torch.Tensor:
        return values.view_as(values)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, weight, flat_index = inputs
        ctx.save_for_backward(flat_index)
        ctx.save_for_forward(flat_index)
        ctx.weight_shape = weight.shape

    @staticmethod
    def jvp(ctx: Any, values_tangent: Optional[torch.Tensor],
            weight_tangent: Optional[torch.Tensor], _: None) -> Optional[torch.Tensor]:
        (flat_index,) = ctx.saved_tensors
        return None if weight_tangent is None else weight_tangent.reshape(-1)[flat_index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (flat_index,) = ctx.saved_tensors
        grad_weight = grad.new_zeros(ctx.weight_shape).reshape(-1).index_put((flat_index,), grad)
        return None, grad_weight.reshape(ctx.weight_shape), None


class _AttachToWeightPlain(torch.autograd.Function):
    """_AttachToWeight without setup_context, for calls outside functorch transforms (which
    need setup_context): torch's apply then skips binding each call's arguments to the
    forward's signature (inspect.signature), ~17 of a call's ~23 us on a 2-core CPU."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                flat_index: torch.Tensor) -> torch.Tensor:
        _AttachToWeight.setup_context(ctx, (values, weight, flat_index), None)
        return _AttachToWeight.forward(values, weight, flat_index)

    backward = staticmethod(_AttachToWeight.backward)


def _mapped(tensor: torch.Tensor) -> bool:
    """Whether a vmap level maps `tensor`, at any depth of torch.func's wrappers (vmap of grad
    over stacked weights: a grad wrapper around a batched tensor). Its values then differ per
    sample, which no single CSR holds."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def folded(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` with any torch.nn.utils.prune mask applied.

    Recomputed as ``<name>_orig * <name>_mask`` rather than read from ``module.<name>``: pruning
    refreshes that attribute only in its pre-forward hook, so it lags any update of ``_orig``.
    """
    if name in pruned_names(module):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def pruned_names(module: nn.Module) -> set:
    """Tensor names that torch.nn.utils.prune reparametrised on ``module``."""
    from torch.nn.utils import prune

    names = set()
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.PruningContainer):
            names.update(h._tensor_name for h in hook)
        elif isinstance(hook, prune.BasePruningMethod):
            names.add(hook._tensor_name)
    return names


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether any hook registry of ``module`` holds a hook."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _copy_hooks(source: nn.Module, target: nn.Module, share: bool = False) -> None:
    """Puts every hook registry of ``source`` into ``target``, minus pruning's pre-hooks (the
    pruning is folded into the weight): copies, or with ``share`` the registries themselves
    (pruning's hooks removed from them), so that the handles a caller holds still remove their
    hooks from ``target`` (sparsify, whose ``source`` leaves the model)."""
    from torch.nn.utils import prune

    for name in _HOOK_DICTS:
        if not hasattr(source, name):
            continue  # registries this torch version does not have
        hooks = getattr(source, name) if share else getattr(source, name).copy()
        if name == "_forward_pre_hooks":
            for key in [k for k, h in hooks.items() if isinstance(h, prune.BasePruningMethod)]:
                del hooks[key]
        setattr(target, name, hooks)
    target._is_full_backward_hook = source._is_full_backward_hook
