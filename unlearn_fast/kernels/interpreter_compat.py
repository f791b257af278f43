"""Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) on a current numpy.

Triton < 3.7's interpreter turns a kernel's runtime scalar (a one-element array) into a Python int with
``int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
every ``range(0, n, BLOCK)`` over a runtime bound then fails. Triton 3.7 reads the one element instead; this
makes older interpreters do the same. Compiled kernels (the GPU) never take that path and are untouched.
"""
from __future__ import annotations


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def patch_interpreter_index() -> bool:
    """Make the interpreter's ``tensor.__index__`` read the one element; True when this call patched it."""
    try:
        import triton
        from triton.runtime import interpreter
    except Exception:  # no triton, or one without an interpreter: nothing to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if _version(triton.__version__) >= (3, 7) or original is None or getattr(original, "_reads_one_element", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)  # then replace its __index__ (the scope restores both, in reverse order)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._reads_one_element = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


__all__ = ["patch_interpreter_index"]
