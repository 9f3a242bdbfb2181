"""Count what a call launches, on CPU: every dispatched aten op (a TorchDispatchMode) and every
Triton kernel launch (a wrapper around the backend's kernels), in the order they run.

A launch is an op that runs work on the device: views, allocations (`empty`) and other
metadata-only ops are recorded as allocations or left out. On CUDA each recorded op is one kernel
launch (cuBLAS GEMMs included); the interpreter's own tensor traffic inside a Triton launch is
not counted.
"""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_NO_WORK = {aten.empty, aten.empty_strided, aten.detach, aten.alias, aten.lift_fresh, aten.set_,
            aten.resize_, aten._local_scalar_dense}
_ALLOCATIONS = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty}


class OpLog(TorchDispatchMode):
    """`launches`: [(name, output shapes)] of ops that run work; `allocations`: the (shape, dtype)
    of every tensor an op creates (views excluded); `kernel_bytes`: {Triton kernel: {"load": bytes,
    "store": bytes}} moved by its launches (interpreter only)."""

    def __init__(self):
        super().__init__()
        self.launches, self.allocations, self._paused = [], [], 0
        self.kernel_bytes = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        packet = func.overloadpacket
        if not func.is_view and not _is_inplace_or_out(func):
            self.allocations += [(tuple(t.shape), t.dtype) for t in outs]
        if not func.is_view and packet not in _NO_WORK and packet not in _ALLOCATIONS:
            self.launches.append((str(packet).removeprefix("aten."), [tuple(t.shape) for t in outs]))
        return out

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def _is_inplace_or_out(func) -> bool:
    """Ops that write into a given tensor (x.add_(...), out=...) allocate nothing."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class _CountedKernel:
    """A Triton kernel whose launches are logged (the interpreter's tensor traffic is not), and,
    under the interpreter, the bytes its loads and stores move (`OpLog.kernel_bytes[name]`)."""

    def __init__(self, kernel, name, log: OpLog):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.launches.append(("triton:" + self.name, [grid]))
            with self.log.paused(), _memory_traffic(self.log.kernel_bytes[self.name]):
                return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def _memory_traffic(counter: dict):
    """Add the bytes of the interpreter's masked loads and stores to counter["load"] / ["store"]."""
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def counted_load(self, ptrs, mask, other, *args):
        out = load(self, ptrs, mask, other, *args)
        counter["load"] += int(mask.data.sum()) * out.data.itemsize
        return out

    def counted_store(self, ptrs, value, mask, *args):
        counter["store"] += int(mask.data.sum()) * value.data.itemsize
        return store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


@contextlib.contextmanager
def counting(backend=None):
    """Yield an OpLog recording every op (and, with the Triton backend module, its kernels)."""
    log = OpLog()
    names = [n for n in dir(backend) if n.endswith("_kernel")] if backend is not None else []
    saved = {n: getattr(backend, n) for n in names}
    for n in names:
        setattr(backend, n, _CountedKernel(saved[n], n.strip("_"), log))
    try:
        with log:
            yield log
    finally:
        for n, k in saved.items():
            setattr(backend, n, k)
