"""The eager route of sparsify.functional.block_ell_linear against the registered op: same bits, and the
op is still what compilers, tracers and dispatch modes see."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify import BlockSparseLinear
from sparsify.functional import block_ell_linear
from tests.test_ops import random_operands

op = torch.ops.sparsify.block_ell_linear


def run(fn, x, values, topology, bias, probe, grad_seed=0):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, values, bias, probe)]
    y = fn(leaves[0], leaves[1], topology, leaves[2], leaves[3])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    y.backward(grad_out)
    return y, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(13,), (2, 5)])
def test_eager_route_gives_the_ops_bits_for_output_and_every_gradient(dtype, bias, leading):
    x, values, topology, b = random_operands(int(torch.tensor(leading).prod()), 64, 48, 16, 2, bias, dtype, seed=21)
    x = x.view(*leading, 64)
    probe = torch.zeros(3 + 4)
    y_eager, grads_eager = run(block_ell_linear, x, values, topology, b, probe)
    y_op, grads_op = run(op, x, values, topology, b, probe)
    assert "_BlockEllLinear" in type(y_eager.grad_fn).__name__  # the eager route ran
    assert torch.equal(y_eager, y_op) and y_eager.dtype == dtype
    for eager, reference in zip(grads_eager, grads_op):
        assert (eager is None) == (reference is None)
        if eager is not None:
            assert eager.dtype == reference.dtype and torch.equal(eager, reference)


def test_eager_route_under_autocast_casts_like_the_op_and_returns_float32_weight_grads():
    x, values, topology, b = random_operands(9, 32, 32, 16, 2, True, torch.float32, seed=22)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, grads_eager = run(block_ell_linear, x, values, topology, b, None)
        y_op, grads_op = run(op, x, values, topology, b, None)
    assert y_eager.dtype == y_op.dtype == torch.bfloat16
    assert torch.equal(y_eager, y_op)
    assert grads_eager[1].dtype == torch.float32 and torch.equal(grads_eager[1], grads_op[1])
    assert torch.equal(grads_eager[0], grads_op[0]) and torch.equal(grads_eager[2], grads_op[2])


def test_without_grad_the_eager_route_computes_the_same_output():
    x, values, topology, b = random_operands(7, 48, 32, 16, 3, True, torch.float32, seed=23)
    with torch.no_grad():
        y = block_ell_linear(x, values.requires_grad_(True), topology, b)
    assert y.grad_fn is None and torch.equal(y, op(x, values.detach(), topology, b))


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_compilers_still_see_the_registered_op():
    layer = BlockSparseLinear(32, 32, block_size=16, density=0.5)
    x = torch.randn(4, 32)
    with _SeenOps() as seen:
        layer(x)
    assert "sparsify.block_ell_linear.default" in seen.names
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    graph = torch.export.export(layer, (x,)).graph
    assert any(node.target is op.default for node in graph.nodes)


def test_layer_training_step_takes_the_eager_route():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5, bias=True)
    y = layer(torch.randn(5, 64))
    assert "_BlockEllLinear" in type(y.grad_fn).__name__
