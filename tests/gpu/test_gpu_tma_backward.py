"""CUDA correctness of the tensor-descriptor backward kernels (grad_input_tma.py, grad_values_tma.py)
against a float64 reference; skipped without CUDA.

    python -m pytest tests/gpu/test_gpu_tma_backward.py -q      # on the GPU machine

B = 64 and 128, bf16 / fp16 / fp32 (tf32 off and on), the autotuned choice and fixed tiles, token counts
not multiple of any tile, K from 1 to C; outputs NaN-poisoned before the kernel writes them; every
result computed twice and compared bitwise.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the GPU checks need CUDA")
TOL = {torch.float32: 1e-5, "tf32": 5e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
CASES = [  # (tokens, block-rows, block-columns, slots)
    (3000, 4, 8, 4),
    (1000, 3, 5, 1),
    (77, 2, 6, 6),
    (513, 5, 7, 3),
]
DTYPES = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)]
GRAD_INPUT_TILES = [None, {"BM": 64, "KC": 64, "num_warps": 4, "num_stages": 4}]
GRAD_VALUES_TILES = [None, {"BT": 64, "KC": 64, "GS": 2, "num_warps": 8, "num_stages": 2}]  # fits fp32 at B = 128


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def operands(m, rows, cols, k, block, dtype):
    g = torch.randn(m, rows * block, device="cuda", dtype=dtype)
    x = torch.randn(m, cols * block, device="cuda", dtype=dtype)
    values = (torch.randn(rows, k, block, block, device="cuda") / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)
    return g, x, values, col


def run_product(product, g, x, values, col, block, config):
    """(the TMA kernel's output into a NaN-poisoned tensor, the float64 reference) for one product, on the
    operands' device (tests/tma_interpreter_checks.py runs it on CPU tensors under the interpreter)."""
    from sparsify.kernels import reference
    from sparsify.kernels.grad_input_tma import grad_input_tma, tma_grad_input_fits
    from sparsify.kernels.grad_values_tma import grad_values_tma, tma_grad_values_fits

    rows, k, cols = col.shape[0], col.shape[1], x.shape[1] // block
    if product == "grad_input":
        assert tma_grad_input_fits(g, values)
        out = grad_input_tma(g, values, col, cols * block, config=config, out=torch.full_like(x, float("nan")))
        return out, reference.grad_input(g.double(), values.double(), col, cols * block)
    assert tma_grad_values_fits(g, x, block)
    poisoned = torch.full((rows, k, block, block), float("nan"), dtype=x.dtype, device=x.device)
    return grad_values_tma(g, x, col, block, config=config, out=poisoned), reference.grad_values(
        g.double(), x.double(), col, block)


@pytest.mark.parametrize("product", ["grad_input", "grad_values"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype,tf32", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tile", range(2))
def test_tma_backward_on_cuda_matches_float64_and_repeats_bitwise(product, block, dtype, tf32, case, tile):
    config = {"grad_input": GRAD_INPUT_TILES, "grad_values": GRAD_VALUES_TILES}[product][tile]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        m, rows, cols, k = case
        g, x, values, col = operands(m, rows, cols, k, block, dtype)
        (out, ref), (again, _) = (run_product(product, g, x, values, col, block, config) for _ in range(2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous  # no tf32 leaks into the tests after this one
    assert rel(out, ref) < TOL["tf32" if tf32 else dtype]
    assert torch.equal(out, again)


WS_TILES = {"grad_input": {"BM": 128, "KC": 64, "WS": True, "num_warps": 4, "num_stages": 4},
            "grad_values": {"BT": 64, "KC": 64, "GS": 1, "WS": True, "num_warps": 4, "num_stages": 4}}


@pytest.mark.parametrize("product", ["grad_input", "grad_values"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=("bf16", "fp16"))
@pytest.mark.parametrize("case", CASES)
def test_warp_specialized_tma_backward_matches_float64_and_repeats_bitwise(product, block, dtype, case):
    """The WS tiles (16-bit operands only: the pruners keep them from float32, which Triton 3.6 cannot compile)."""
    m, rows, cols, k = case
    g, x, values, col = operands(m, rows, cols, k, block, dtype)
    (out, ref), (again, _) = (run_product(product, g, x, values, col, block, WS_TILES[product]) for _ in range(2))
    assert rel(out, ref) < TOL[dtype]
    assert torch.equal(out, again)
