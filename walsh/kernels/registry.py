"""How the kernels become torch ops: ``triton_op`` where Triton compiles, an opaque
``custom_op`` under the Triton interpreter.

Why ``torch.library.triton_op``: torch.compile sees into it. Inductor puts the op's torch ops
(allocations, a bmm, casts) into its graph and launches each Triton kernel
from its own generated code, where an opaque ``custom_op`` is called through the dispatcher
and Triton's Python launcher. The 125M models on these kernels can be bound by the host
without CUDA graphs (on the slower lent hosts); on a fast H200 host the two forms measured
equal (docs/benchmarks.md, session 7).

Why not everywhere: under ``TRITON_INTERPRET=1`` (how CI runs the kernels on CPU),
``triton.jit`` returns an interpreter function that ``wrap_triton`` passes through untraced, so
tracing the op with fake tensors would run the interpreter on them and fail. There the op is an
opaque ``custom_op`` with the given fake, as it always was. The kernels, their arguments and
their results are the same either way; only what compile sees differs. The GPU-marked tests
cover the ``triton_op`` form, CI the other (and, in a process without the interpreter, that
torch finds each triton op's kernels).

``wrap_triton(kernel)`` (this module's) is what the launchers call instead of ``kernel``
itself: torch's ``wrap_triton`` while compile traces an op body (so the traced op records the
launch), the plain kernel otherwise. It keeps torch's name on purpose: torch finds a
``triton_op``'s kernels, which go into compile's cache key, by scanning the op's source (and
the functions it calls) for calls named ``wrap_triton``; under another name an edited kernel
could be served stale from a warm cache. The launchers' own Python (a dispatch rule, a launch
shape, a constant) is not in the key: after editing it, clear the inductor cache
(``TORCHINDUCTOR_CACHE_DIR``); measured in session 21 (``walsh.kernels.block_matmul``).

Kernel arguments never alias: a pointer a kernel does not use gets its own empty tensor, not
another argument (compile decides from the kernel which arguments are written; where that
analysis fails it treats all as written, and an aliased pair would then be copied apart).

On a GPU the ``fake`` given to ``kernel_op`` is unused: a ``triton_op`` traces its own body for
shapes, which launches the kernel, so these ops do not run on meta tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from torch.library import triton_op
from torch.library import wrap_triton as _torch_wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton.runtime.jit import JITFunction


@triton.jit
def _probe():
    pass


# triton.jit gives a JITFunction when it compiles, an interpreter function under TRITON_INTERPRET
INTERPRETED = not isinstance(_probe, JITFunction)

# the launchers' shared threshold: tensors from this many elements on take int64 offsets (int32
# would wrap); below it int32 index math is cheaper
WIDE_NUMEL = 2**31


def wrap_triton(kernel):
    """The kernel as a launcher calls it: torch's ``wrap_triton`` while compile traces (dynamo,
    or any torch dispatch mode: fake, functional, proxy), else the kernel itself. Eager
    ``triton_op`` bodies run with wrapping off anyway; this is for launchers called outside an
    op (``walsh bench layer``, tests), where the wrapper would dispatch each launch through a
    higher-order op (measured on an H200: a transform took 188 us instead of its 35 us
    kernel). Under an unrelated eager dispatch mode (a FLOP counter, say) a raw launch is
    wrapped too, and runs through that mode."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return _torch_wrap_triton(kernel)
    return kernel


def kernel_op(name: str, fake: Callable) -> Callable:
    """Decorator: ``fn`` as the op ``name`` (no mutated arguments). ``fake`` gives the
    outputs' shapes for the interpreter's custom op; a ``triton_op`` traces ``fn`` instead."""

    def register(fn: Callable):
        if INTERPRETED:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return triton_op(name, mutates_args=())(fn)

    return register
