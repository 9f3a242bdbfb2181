"""Load the Triton backend so its kernels run here: compiled on CUDA, interpreted on CPU.

The interpreter is chosen when ``triton.jit`` decorates a kernel (module import time), so the
variable is set only while the module imports (or re-imports) and is restored afterwards: other
test files and an earlier import cannot change the outcome. The reload mutates the module in
place, so ``fastmgrpo.kernels`` (which imports it lazily) sees the interpreted kernels too.
"""
import importlib
import importlib.util
import os
import sys

import torch
import triton  # noqa: F401  (imported un-interpreted first, so the sm_90 compile test can run too)
import triton.language  # noqa: F401

CUDA = torch.cuda.is_available()


def _index_scalar_blocks():
    """Triton < 3.7's interpreter holds a scalar as a shape-(1,) array and converts it for
    `range(0, V, BLOCK)` with `int(array)`, which NumPy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); later Triton squeezes first. Same fix here,
    for the interpreter only: compiled kernels never take this path."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "squeezes_scalars", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True
    interpreter._patch_lang_tensor = patched
DEV = "cuda" if CUDA else "cpu"
MODULE = "fastmgrpo.kernels.triton_backend"


def load_backend():
    """The triton_backend module, interpreted unless CUDA is present."""
    if CUDA:
        return importlib.import_module(MODULE)
    _index_scalar_blocks()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get(MODULE) or importlib.import_module(MODULE)
        if not mod.interpreting():
            mod = importlib.reload(mod)  # imported earlier without the interpreter
        try:  # the interpreter imports gluon on its first launch, which asserts interpret mode then
            importlib.import_module("triton.experimental.gluon")
        except ImportError:
            pass
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert mod.interpreting()
    return mod


def load_compiled_copy():
    """A second, non-interpreted instance of the module (for ahead-of-time compiles on CPU)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        path = importlib.util.find_spec(MODULE).origin
        spec = importlib.util.spec_from_file_location("fastmgrpo.kernels._triton_compiled_copy", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses need the module registered
        spec.loader.exec_module(mod)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return mod
