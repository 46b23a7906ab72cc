"""Work around triton-lang/triton#9171 in the CPU interpreter (TRITON_INTERPRET=1 only).

With numpy >= 2.4 the interpreter's `tensor.__index__` does `int(array_of_shape_(1,))`, which numpy now
rejects, so any `for b in range(0, runtime_scalar)` in a kernel fails under the interpreter (compiled
kernels are unaffected). We apply the upstream fix (squeeze before int) by wrapping the interpreter's
patch function; the patch is still scoped and undone by the interpreter after each launch.
"""
from __future__ import annotations

import os

_applied = False


def apply() -> None:
    global _applied
    if _applied or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        import numpy as np
        from triton.runtime import interpreter
    except Exception:  # no triton / no interpreter: nothing to fix
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return
    try:
        int(np.zeros((1,)))
        return  # this numpy still converts size-1 arrays: the bug cannot trigger
    except TypeError:
        pass

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _applied = True
