"""What the op promises beyond the numbers: derivatives of every order match nn.Linear, bad inputs are
rejected with an error that says what to do (before anything runs), and the output is an ordinary
tensor. Each check runs on both routes: functional's eager Function and the registered op."""

import pytest
import torch

from sparsify import block_ell
from sparsify.functional import block_ell_linear
from tests.test_ops import random_operands

ROUTES = {"eager": block_ell_linear, "op": torch.ops.sparsify.block_ell_linear}


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def dense_twin(x, values, topology, bias):
    """The same layer as nn.Linear on the densified weight (float64 leaves)."""
    weight = block_ell.to_dense(values.detach(), topology, x.shape[-1])
    return leaves(x, weight, bias)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_penalty_on_the_input_gradient_reaches_every_parameter_like_nn_linear(route):
    x, values, topology, bias = random_operands(6, 48, 32, 16, 2, True, torch.float64, seed=40)

    def penalized(fn, x, weight, bias):
        y = fn(x, weight, bias)
        task = y.square().mean()
        (grad_x,) = torch.autograd.grad(task, x, create_graph=True)
        (task + 10 * grad_x.square().sum()).backward()

    sx, sv, sb = leaves(x, values, bias)
    penalized(lambda x, v, b: ROUTES[route](x, v, topology, b), sx, sv, sb)
    dx, dw, db = dense_twin(x, values, topology, bias)
    penalized(torch.nn.functional.linear, dx, dw, db)
    assert torch.allclose(sv.grad, block_ell.gather_blocks(dw.grad, topology, 16), rtol=1e-10, atol=1e-12)
    assert torch.allclose(sx.grad, dx.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sb.grad, db.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_penalty_on_the_weight_gradient_reaches_the_input_like_nn_linear(route):
    x, values, topology, bias = random_operands(5, 32, 48, 16, 1, False, torch.float64, seed=41)

    def penalized(fn, x, weight, gather):
        y = fn(x, weight)
        task = (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum() + y.pow(3).sum()
        (grad_w,) = torch.autograd.grad(task, weight, create_graph=True)
        (task + gather(grad_w).square().sum()).backward()

    sx, sv = leaves(x, values)
    penalized(lambda x, v: ROUTES[route](x, v, topology), sx, sv, lambda g: g)
    dx, dw, _ = dense_twin(x, values, topology, None)
    penalized(torch.nn.functional.linear, dx, dw, lambda g: block_ell.gather_blocks(g, topology, 16))
    assert torch.allclose(sx.grad, dx.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sv.grad, block_ell.gather_blocks(dw.grad, topology, 16), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_output_can_be_modified_in_place_under_autograd(route):
    x, values, topology, bias = random_operands(2 * 3, 32, 32, 16, 1, True, torch.float32, seed=42)
    for shape in ((6, 32), (2, 3, 32)):
        sx, sv, sb = leaves(x.view(shape), values, bias)
        y = ROUTES[route](sx, sv, topology, sb)
        y += 1
        y.mul_(2)
        y.sum().backward()
        tx, tv, tb = leaves(x.view(shape), values, bias)
        (2 * (ROUTES[route](tx, tv, topology, tb) + 1)).sum().backward()
        assert torch.equal(sv.grad, tv.grad) and torch.equal(sx.grad, tx.grad)


@pytest.mark.parametrize("width", [128, 32])
@pytest.mark.parametrize("route", list(ROUTES))
def test_an_input_of_another_width_than_the_weight_is_rejected_naming_the_expected_width(route, width):
    _, values, topology, bias = random_operands(3, 64, 32, 16, 2, True, torch.float32, seed=43)
    x = torch.randn(3, width)
    message = rf"input has {width} features but the weight expects 64 \(= C \* B = 4 \* 16\)"
    probe = torch.zeros(2 + 4, requires_grad=True)  # [R + C]: the op learns C from the probe
    with pytest.raises(ValueError, match=message):
        ROUTES[route](x, values, topology, bias, probe)
    with pytest.raises(ValueError, match=message):
        block_ell_linear(x, values, topology, bias, in_features=64)


@pytest.mark.parametrize("route", list(ROUTES))
def test_complex_inputs_are_rejected(route):
    x, values, topology, _ = random_operands(3, 32, 32, 16, 1, False, torch.float32, seed=44)
    with pytest.raises(ValueError, match="real floating point"):
        ROUTES[route](x.to(torch.complex64), values.to(torch.complex64), topology)


def test_grad_values_rejects_a_negative_column_instead_of_wrapping():
    x, values, topology, _ = random_operands(4, 32, 32, 16, 1, False, torch.float32, seed=45)
    topology[1, 0] = -1
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        torch.ops.sparsify.block_ell_grad_values(torch.randn(4, 32), x, topology, 16)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        torch.ops.sparsify.block_ell_grad_input(torch.randn(4, 32), values, topology, 32)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("operand", ["col_indices", "bias", "values"])
def test_an_operand_on_another_device_is_rejected(route, operand):
    x, values, topology, bias = random_operands(3, 32, 32, 16, 1, True, torch.float32, seed=46)
    operands = dict(values=values, col_indices=topology, bias=bias)
    operands[operand] = operands[operand].to("meta")
    with pytest.raises(ValueError, match=f"{operand} is on meta but the input is on cpu"):
        ROUTES[route](x, operands["values"], operands["col_indices"], operands["bias"])


def test_grad_ops_reject_operands_on_different_devices():
    x, values, topology, _ = random_operands(3, 32, 32, 16, 1, False, torch.float32, seed=47)
    with pytest.raises(ValueError, match="share one device"):
        torch.ops.sparsify.block_ell_grad_values(torch.randn(3, 32), x, topology.to("meta"), 16)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_float64_stats_probe_receives_energies_beyond_float32s_range(route):
    _, values, topology, _ = random_operands(32, 64, 32, 16, 2, False, torch.float32, seed=48)
    x = torch.full((32, 64), 1e18, requires_grad=True)  # each block's energy: 32 * 16 * 1e36 > float32 max
    probe = torch.zeros(2 + 4, dtype=torch.float64, requires_grad=True)
    ROUTES[route](x, values, topology, None, probe).sum().backward()
    assert probe.grad.dtype == torch.float64
    assert torch.allclose(probe.grad[2:], torch.full((4,), 32 * 16 * 1e36, dtype=torch.float64), rtol=1e-6)
