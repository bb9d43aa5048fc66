"""Block-ELL compute kernels. ``reference`` is plain PyTorch; ``forward`` and ``backward`` are the
Triton kernels. All three expose the same launchers:

    forward(x [M, in], values [R, K, B, B], col_indices [R, K], bias [out] | None) -> [M, out]
    grad_input(grad_out [M, out], values, col_indices, in_features) -> [M, in]
    grad_values(grad_out [M, out], x [M, in], col_indices, block_size) -> [R, K, B, B]
"""

from __future__ import annotations

from types import SimpleNamespace


def load_triton() -> SimpleNamespace:
    """The Triton launchers; raises ImportError where Triton or the kernels are missing."""
    from sparsify.kernels.backward import grad_input, grad_values
    from sparsify.kernels.forward import forward

    return SimpleNamespace(forward=forward, grad_input=grad_input, grad_values=grad_values)
