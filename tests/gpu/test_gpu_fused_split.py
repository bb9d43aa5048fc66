"""The split forward summed inside the kernel (kernel option split_reduce="fused") on the GPU: the same bits
as the second launch at decode sizes for every block size and the dtypes decode uses, call after call
(arrivals are counted with atomics, so the order in which programs finish changes from call to call and
only the fixed summation order keeps the bits), in a CUDA graph replayed many times, and on two streams
at once (each counts in its own buffer); skipped without CUDA."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import sparsify  # noqa: E402
from sparsify.kernels import dispatch, reference  # noqa: E402
from sparsify.kernels.split_counters import split_counters  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU checks need CUDA")


def operands(m, in_f, out_f, block, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows, cols = out_f // block, in_f // block
    k = cols // 2
    x = torch.randn(m, in_f, device="cuda", dtype=dtype, generator=gen)
    values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    bias = torch.randn(out_f, device="cuda", dtype=dtype, generator=gen)
    return x, values, col, bias


def forward(x, values, col, bias, split_reduce):
    out = torch.full((x.shape[0], values.shape[0] * values.shape[2]), float("nan"), dtype=x.dtype, device="cuda")
    with sparsify.kernel_options(split_reduce=split_reduce):
        return dispatch.triton_forward(x, values, col, bias, out=out, poison=True)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("block", (16, 32, 64, 128))
@pytest.mark.parametrize("m, in_f, out_f", [(16, 8192, 1024), (5, 8192, 4096), (32, 16384, 512)])
def test_fused_split_gives_the_bits_of_the_second_launch_call_after_call(m, in_f, out_f, block, dtype):
    x, values, col, bias = operands(m, in_f, out_f, block, dtype, seed=block + m)
    k = values.shape[1]
    split = dispatch.split_slots(m, values.shape[0], k, block, x.element_size(), x.device)
    assert split > 1, f"B = {block}, {in_f}->{out_f}: no split, nothing to check"
    launched = forward(x, values, col, bias, "launch")
    ref = reference.forward(x.double(), values.double(), col, bias.double())
    assert torch.isfinite(launched).all() and ((launched.double() - ref).norm() / ref.norm()).item() < 1.5e-2
    for _ in range(20):
        assert torch.equal(forward(x, values, col, bias, "fused"), launched)
    assert not split_counters(x, 1).any()


def test_fused_split_replayed_in_a_cuda_graph_keeps_its_bits_and_its_counters_at_zero():
    x, values, col, bias = operands(16, 4096, 2048, 64, torch.bfloat16, seed=3)
    launched = forward(x, values, col, bias, "launch")
    out = torch.empty_like(launched)
    with sparsify.kernel_options(split_reduce="fused"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dispatch.triton_forward(x, values, col, bias, out=out)  # autotuned before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                dispatch.triton_forward(x, values, col, bias, out=out)
    for _ in range(50):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, launched)


def test_two_streams_at_once_count_in_their_own_buffers():
    x, values, col, bias = operands(16, 8192, 1024, 32, torch.bfloat16, seed=5)
    launched = forward(x, values, col, bias, "launch")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[torch.empty_like(launched) for _ in range(10)] for _ in streams]
    torch.cuda.synchronize()
    with sparsify.kernel_options(split_reduce="fused"):
        for _ in range(10):
            for stream, results in zip(streams, outs):
                with torch.cuda.stream(stream):
                    for out in results:
                        dispatch.triton_forward(x, values, col, bias, out=out)
    torch.cuda.synchronize()
    for results in outs:
        for out in results:
            assert torch.equal(out, launched)
    buffers = {split_counters(x, 1).data_ptr()}
    for stream in streams:
        with torch.cuda.stream(stream):
            buffers.add(split_counters(x, 1).data_ptr())
    assert len(buffers) == 3
