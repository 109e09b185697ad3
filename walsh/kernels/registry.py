"""How the kernels become torch ops: ``triton_op`` where Triton compiles, an opaque
``custom_op`` under the Triton interpreter.

Why ``torch.library.triton_op``: torch.compile sees into it. Inductor puts the op's torch ops
(allocations, a bmm, a partial-sum reduction) into its graph and launches each Triton kernel
from its own generated code. An opaque ``custom_op`` instead costs host time per call in the
dispatcher and Triton's Python launcher, and the 125M models on these kernels are bound by the
host when run without CUDA graphs (docs/benchmarks.md, session 7).

Why not everywhere: under ``TRITON_INTERPRET=1`` (how CI runs the kernels on CPU),
``triton.jit`` returns an interpreter function that ``wrap_triton`` passes through untraced, so
tracing the op with fake tensors would run the interpreter on them and fail. There the op is an
opaque ``custom_op`` with the given fake, as it always was. The kernels, their arguments and
their results are the same either way; only what compile sees differs. The GPU-marked tests
cover the ``triton_op`` form, CI the other.

``launch(kernel)`` is what the launchers call instead of ``kernel`` itself: ``wrap_triton``
while compile traces an op body (so the traced op records the launch), the plain kernel
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton.runtime.jit import JITFunction


@triton.jit
def _probe():
    pass


# triton.jit gives a JITFunction when it compiles, an interpreter function under TRITON_INTERPRET
INTERPRETED = not isinstance(_probe, JITFunction)


def launch(kernel):
    """The kernel as an op body launches it: ``wrap_triton`` while compile traces (dynamo, or
    a fake / functional tensor mode), else the kernel itself. Outside tracing, the wrapper would
    dispatch every launch through a higher-order op: measured on an H200, a transform called
    that way took 188 us of host time against its 35 us kernel."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return wrap_triton(kernel)
    return kernel


def kernel_op(name: str, fake: Callable) -> Callable:
    """Decorator: ``fn`` as the op ``name`` (no mutated arguments). ``fake`` gives the
    outputs' shapes; a ``triton_op`` derives them from ``fn`` itself and ignores it."""

    def register(fn: Callable):
        if INTERPRETED:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return triton_op(name, mutates_args=())(fn)

    return register
