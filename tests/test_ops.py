"""The op against a float64 dense reference: forward, grad_input, grad_values, bias grad."""

import pytest
import torch

import sparsify  # registers the ops
from sparsify import block_ell
from sparsify.kernels import reference
from tests.conftest import relative_error

op = torch.ops.sparsify.block_ell_linear


def random_operands(m, in_features, out_features, block_size, k, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = out_features // block_size, in_features // block_size
    topology = torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    values = torch.randn(rows, k, block_size, block_size, generator=gen).to(dtype)
    x = torch.randn(m, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x, values, topology, b


def dense_reference(x, values, topology, bias, grad_out):
    """Forward and all gradients through a float64 dense weight, masked to the kept blocks."""
    in_features = x.shape[-1]
    weight = block_ell.to_dense(values.detach().double(), topology, in_features).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    y = torch.nn.functional.linear(x64, weight, b64)
    y.backward(grad_out.double())
    grad_values = block_ell.gather_blocks(weight.grad, topology, values.shape[-1])
    return y, x64.grad, grad_values, (b64.grad if b64 is not None else None)


@pytest.mark.parametrize("m", [1, 7, 37])
@pytest.mark.parametrize("block_size, in_features, out_features", [(4, 24, 16), (16, 64, 48), (8, 40, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_all_gradients_match_float64_dense(m, block_size, in_features, out_features, bias):
    cols = in_features // block_size
    for k in sorted({1, max(1, cols // 2), cols}):
        x, values, topology, b = random_operands(m, in_features, out_features, block_size, k, bias, torch.float32, seed=m + k)
        x.requires_grad_(True)
        values.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
        y = op(x, values, topology, b)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
        ref_y, ref_gx, ref_gv, ref_gb = dense_reference(x.detach(), values.detach(), topology, b, grad_out)
        assert relative_error(y, ref_y) < 1e-6
        assert relative_error(x.grad, ref_gx) < 1e-6
        assert relative_error(values.grad, ref_gv) < 1e-6
        if b is not None:
            assert relative_error(b.grad, ref_gb) < 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_dtypes_stay_close_and_keep_their_dtype(dtype, tol):
    x, values, topology, b = random_operands(19, 64, 32, 16, 2, True, dtype, seed=3)
    y = op(x, values, topology, b)
    assert y.dtype == dtype
    ref = dense_reference(x, values, topology, b, torch.zeros(19, 32))[0]
    assert relative_error(y, ref) < tol


def test_three_dimensional_input_keeps_its_leading_shape():
    x, values, topology, b = random_operands(2 * 5, 32, 48, 16, 1, True, torch.float32, seed=4)
    x3 = x.view(2, 5, 32)
    y = op(x3, values, topology, b)
    assert y.shape == (2, 5, 48)
    assert torch.equal(y.view(10, 48), op(x, values, topology, b))


def test_empty_batch_returns_empty_output_and_zero_gradients():
    x, values, topology, b = random_operands(0, 32, 32, 16, 1, True, torch.float32, seed=5)
    values.requires_grad_(True)
    x.requires_grad_(True)
    y = op(x, values, topology, b)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert values.grad.abs().sum() == 0 and x.grad.shape == (0, 32)


def test_out_of_range_column_is_rejected_on_cpu():
    x, values, topology, b = random_operands(3, 32, 32, 16, 1, True, torch.float32, seed=6)
    topology[0, 0] = 2  # only columns 0 and 1 exist
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        op(x, values, topology, b)


def test_mismatched_dtypes_raise_a_clear_error():
    x, values, topology, b = random_operands(3, 32, 32, 16, 1, False, torch.float32, seed=7)
    with pytest.raises(ValueError, match="autocast"):
        op(x.double(), values, topology, b)


def test_autocast_casts_like_nn_linear():
    x, values, topology, b = random_operands(5, 32, 32, 16, 2, True, torch.float32, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, values, topology, b)
        dense = torch.nn.functional.linear(x, block_ell.to_dense(values, topology, 32), b)
    assert y.dtype == dense.dtype == torch.bfloat16
    assert relative_error(y, dense) < 1e-2


def test_stats_probe_gradient_is_row_error_energy_and_column_activation_energy():
    x, values, topology, b = random_operands(9, 48, 32, 16, 2, True, torch.float32, seed=9)
    probe = torch.zeros(2 + 3, requires_grad=True)
    y = op(x, values, topology, b, probe)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected_rows = grad_out.view(9, 2, 16).pow(2).sum(dim=(0, 2))
    expected_cols = x.view(9, 3, 16).pow(2).sum(dim=(0, 2))
    assert torch.allclose(probe.grad, torch.cat([expected_rows, expected_cols]), rtol=1e-5)


def test_reference_chunks_tokens_without_changing_results(monkeypatch):
    x, values, topology, b = random_operands(50, 64, 64, 16, 3, True, torch.float32, seed=10)
    whole = reference.forward(x, values, topology, b)
    grad_out = torch.randn(50, 64)
    whole_gx = reference.grad_input(grad_out, values, topology, 64)
    whole_gv = reference.grad_values(grad_out, x, topology, 16)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1000)  # forces many chunks
    assert torch.allclose(reference.forward(x, values, topology, b), whole, atol=1e-6)
    assert torch.allclose(reference.grad_input(grad_out, values, topology, 64), whole_gx, atol=1e-6)
    assert torch.allclose(reference.grad_values(grad_out, x, topology, 16), whole_gv, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_passes(bias):
    x, values, topology, b = random_operands(6, 32, 48, 16, 1, bias, torch.float32, seed=11)
    x.requires_grad_(True)
    values.requires_grad_(True)
    torch.library.opcheck(op, (x, values, topology, b))
    grad_out = torch.randn(6, 48)
    torch.library.opcheck(torch.ops.sparsify.block_ell_grad_input, (grad_out, values.detach(), topology, 32))
    torch.library.opcheck(torch.ops.sparsify.block_ell_grad_values, (grad_out, x.detach(), topology, 16))


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend='cublas'"):
        with sparsify.kernel_options(backend="cublas"):
            pass
    with pytest.raises(ValueError, match="SPARSIFY_BACKEND='cublas'"):
        sparsify.KernelOptions.from_env({"SPARSIFY_BACKEND": "cublas"})
