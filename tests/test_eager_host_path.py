"""The short cuts of the eager call path (host time per layer call): each gives what the long way gives."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from sparsify import BlockSparseLinear, kernel_options, ops
from sparsify.functional import _BlockEllLinear
from tests.test_ops import random_operands

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fwd_bwd(apply, x, values, topology, bias, probe):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, values, bias, probe)]
    y = apply(leaves[0], leaves[1], topology, leaves[2], leaves[3])
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype))
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_apply_gives_function_apply_bits_for_output_and_every_gradient(dtype):
    x, values, topology, bias = random_operands(7, 64, 48, 16, 2, True, dtype, seed=5)
    probe = torch.zeros(3 + 4)
    y_short, grads_short = _fwd_bwd(ops.eager_apply(_BlockEllLinear), x, values, topology, bias, probe)
    y_long, grads_long = _fwd_bwd(_BlockEllLinear.apply, x, values, topology, bias, probe)
    assert type(y_short.grad_fn) is type(y_long.grad_fn)
    assert torch.equal(y_short, y_long)
    for short, long in zip(grads_short, grads_long):
        assert short.dtype == long.dtype and torch.equal(short, long)


def test_eager_apply_refuses_a_function_with_setup_context():
    class WithSetup(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    with pytest.raises(TypeError, match="setup_context"):
        ops.eager_apply(WithSetup)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_gradient_of_half_precision_layer_equals_nn_linear_bitwise(dtype):
    torch.manual_seed(0)
    layer = BlockSparseLinear(64, 96, block_size=16, density=0.5).to(dtype)
    dense = layer.to_linear()
    x = torch.randn(37, 64).to(dtype)
    grad = torch.randn(37, 96).to(dtype)
    layer(x).backward(grad)
    dense(x).backward(grad)
    assert layer.bias.grad.dtype == dtype
    assert torch.equal(layer.bias.grad, dense.bias.grad)


def test_probe_gradient_holds_squared_block_norms_of_grad_out_and_input():
    torch.manual_seed(0)
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    layer.stats_probe.requires_grad_(True)
    x = torch.randn(2, 5, 64, dtype=torch.float32)  # 3-D: the reshaping branch
    grad = torch.randn(2, 5, 32)
    layer(x).backward(grad)
    expected = torch.cat([grad.double().reshape(-1, 2, 16).square().sum((0, 2)),
                          x.double().reshape(-1, 4, 16).square().sum((0, 2))])
    torch.testing.assert_close(layer.stats_probe.grad.double(), expected, rtol=1e-5, atol=0)


def test_host_overhead_dry_run_writes_ratios_with_device_versions_and_date(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CPU_CASES", [(64, 128, 4)])
    argv = ["host_overhead.py", "--device", "cpu", "--calls", "2", "--repeats", "3", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with kernel_options():
        bench.main()
    (path,) = tmp_path.glob("host-overhead-*.json")
    report = json.loads(path.read_text())
    assert report["device"].startswith("cpu") and report["torch"] == torch.__version__ and report["date"]
    rows = report["measurements"]
    assert [(r["B"], r["probe"]) for r in rows] == [(16, False), (16, True), (64, False), (64, True)]
    for row in rows:
        assert row["host_ratio"] == pytest.approx(row["sparse_host_us"] / row["dense_host_us"], rel=0.02)
        assert row["sparse_host_min_us"] <= row["sparse_host_us"]
