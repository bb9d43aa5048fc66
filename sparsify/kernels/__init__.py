"""Block-ELL compute kernels. ``reference`` is plain PyTorch; the Triton kernels live one op (or
variant) a file, and ``dispatch`` decides which runs. Both backends expose the same launchers
(``reference`` and ``dispatch.triton_kernels()``):

    forward(x [M, in], values [R, K, B, B], col_indices [R, K], bias [out] | None) -> [M, out]
    grad_input(grad_out [M, out], values, col_indices, in_features) -> [M, in]
    grad_values(grad_out [M, out], x [M, in], col_indices, block_size) -> [R, K, B, B]
"""
