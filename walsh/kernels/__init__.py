"""Triton kernels, each beside the naive PyTorch reference with the same signature.

- ``walsh.kernels.ternary``: fused ternary weight quantization (reference: ``walsh.quant``).
- ``walsh.kernels.walsh_transform``: the Walsh-Hadamard layer's block transforms fused with
  alpha/beta and the layout changes (reference: ``walsh_in_naive`` / ``walsh_out_naive``);
  their one Triton kernel is in ``walsh.kernels.walsh_transform_kernel``.
- ``walsh.kernels.walsh_linear``: the whole Walsh-Hadamard layer as one op, in those
  three kernels or in one (reference: ``walsh_linear_naive``).
- ``walsh.kernels.walsh_group``: two or three Walsh-Hadamard layers that share their input
  (q, k, v; gate, up) as one op that reads it once and writes one input gradient (reference:
  ``walsh_group_naive``, the layers one by one).
- ``walsh.kernels.walsh_swiglu``: the MLP's down projection on silu(gate) * up as one op that
  computes the product in the layer's own passes and never stores it (reference:
  ``swiglu_linear_naive``).
- ``walsh.kernels.walsh_mlp``: the whole Walsh MLP (gate, up, down) as one op, the transforms on
  either side of gate and up chained in one pass each way (kernel:
  ``walsh.kernels.walsh_mlp_kernel``; reference: ``walsh_mlp_naive``).
- ``walsh.kernels.block_matmul``: the three-kernel layers' per-block GEMMs (y, du, dw) on
  narrow rows, where they beat cuBLAS's batched GEMM, and du with dw in one pass over dy
  (reference: ``block_mm_naive``, ``block_mm_tn_naive``, ``block_mm_dual_naive``,
  torch.bmm).
- ``walsh.kernels.column_sum``: the fixed-order sum of the gain passes' per-program partial
  sums, a backward op's tables in one launch (reference: ``column_sum_naive``,
  ``part.sum(0)``).
- ``walsh.kernels.int8_linear``: ternary layers with 8-bit activations on INT8 tensor cores
  (reference: ``int8_linear_naive``, the fake-quantized product).

``walsh.kernels.registry`` makes each launcher a torch op: a ``triton_op`` (compile sees and
launches the kernels itself) where Triton compiles, an opaque custom op under the interpreter.

Importing a submodule needs ``triton``. Kernels run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (how CI tests them); which path a layer takes is a config value
(``walsh_impl``), never an environment switch.
"""

# how ``walsh_impl=triton``'s passes mix their blocks (``walsh_launch.transform_mix``): named
# here, where nothing imports triton, so that the benches' CLI can offer them without it
TRANSFORM_MIXES = ("rule", "dot", "butterflies")
