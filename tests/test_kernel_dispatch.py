"""kernels/dispatch.py: the kernel options (environment defaults read once and validated, the context
manager), and the routing rules that read them."""

import os
import types

import pytest
import torch

import sparsify
from sparsify import KernelOptions, kernel_options
from sparsify.kernels import dispatch
from tests.test_ops import random_operands

op = torch.ops.sparsify.block_ell_linear


@pytest.mark.parametrize(
    "variable, value",
    [
        ("SPARSIFY_BACKEND", "cuda"),
        ("SPARSIFY_BLOCK_KERNEL", "blocks"),
        ("SPARSIFY_TMA", "maybe"),
        ("SPARSIFY_LEAN_LAUNCH", "yes please"),
        ("SPARSIFY_CHECK_COLUMNS", "2"),
        ("SPARSIFY_GROUPED", "fast"),
        ("SPARSIFY_SPLIT_REDUCE", "atomic"),
    ],
)
def test_an_unknown_environment_value_is_an_error_naming_the_variable(variable, value):
    with pytest.raises(ValueError, match=f"{variable}={value!r} is not one of"):
        KernelOptions.from_env({variable: value})


def test_environment_values_map_onto_the_option_fields():
    env = {"SPARSIFY_BACKEND": " Reference ", "SPARSIFY_BLOCK_KERNEL": "tile", "SPARSIFY_TMA": "1",
           "SPARSIFY_LEAN_LAUNCH": "0", "SPARSIFY_CHECK_COLUMNS": "off", "SPARSIFY_GROUPED": "WS",
           "SPARSIFY_SPLIT_REDUCE": "Fused"}
    assert KernelOptions.from_env(env) == KernelOptions(
        backend="reference", block_kernel="tile", tma="on", lean_launch=False, check_columns=False, grouped="ws",
        split_reduce="fused",
    )
    assert KernelOptions.from_env({}) == KernelOptions()


def test_kernel_options_restore_the_previous_options_and_reject_unknown_values_without_change():
    before = dispatch.options()
    with kernel_options(block_kernel="gather") as inside:
        assert dispatch.options() is inside and inside.block_kernel == "gather"
        with pytest.raises(ValueError, match="tma='sometimes'"):
            with kernel_options(tma="sometimes"):
                pass
        assert dispatch.options() is inside
    assert dispatch.options() == before


def test_the_environment_is_not_read_on_the_per_call_path(monkeypatch):
    x, values, topology, b = random_operands(4, 32, 32, 16, 1, True, torch.float32, seed=1)
    values.requires_grad_(True)
    op(x, values, topology, b).sum().backward()  # first call: defaults loaded

    read = []

    class Recording(dict):
        def get(self, key, default=None):
            read.append(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    monkeypatch.setattr(os, "environ", Recording(os.environ))
    for fn in (op, sparsify.functional.block_ell_linear):
        fn(x, values, topology, b).sum().backward()
    assert not [key for key in read if key.startswith(("SPARSIFY_", "TRITON_"))]


def test_the_triton_backend_on_cpu_tensors_without_the_interpreter_says_what_it_needs():
    assert not dispatch.interpreting()  # this process: no TRITON_INTERPRET
    x, values, topology, b = random_operands(3, 32, 32, 16, 1, False, torch.float32, seed=2)
    with kernel_options(backend="triton"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            op(x, values, topology, b)
    with kernel_options(backend="reference"):
        assert dispatch.backend_for(torch.device("cuda")) == "reference"
    assert dispatch.backend_for(torch.device("cpu")) == "reference"  # auto off CUDA


def test_the_block_kernel_option_overrides_the_measured_tile_thresholds():
    tokens = dispatch.TILE_MIN_TOKENS
    assert dispatch.use_tiles(16, 0.5, tokens) and not dispatch.use_tiles(16, 0.5, tokens - 1)
    assert not dispatch.use_tiles(64, 0.5, tokens) and not dispatch.use_tiles(32, 0.25, tokens)
    with kernel_options(block_kernel="tile"):
        assert dispatch.use_tiles(64, 0.1, 1)
    with kernel_options(block_kernel="gather"):
        assert not dispatch.use_tiles(16, 0.9, 1 << 20)


def test_at_32x32_blocks_the_forward_gathers_where_the_backward_takes_the_tiles():
    """Measured on the H200 at density 0.5: the gather forward is faster, the tile backward is faster."""
    tokens = dispatch.TILE_MIN_TOKENS
    assert not dispatch.use_tiles(32, 0.5, tokens, "forward") and dispatch.use_tiles(32, 0.5, tokens, "backward")
    assert dispatch.use_tiles(32, 0.75, tokens, "forward")
    assert dispatch.use_tiles(16, 0.5, tokens, "forward") and dispatch.use_tiles(16, 0.5, tokens, "backward")


def test_the_tma_forward_is_never_chosen_off_cuda():
    x = torch.randn(512, 1024)
    values = torch.randn(2, 4, 128, 128)
    with kernel_options(tma="on"):
        assert not dispatch.use_tma(x, values, 512)


def test_the_grouped_kernels_route_by_default_only_where_measured_faster_and_never_off_cuda():
    x = torch.randn(512, 1024, dtype=torch.bfloat16)
    values = torch.randn(16, 8, 64, 64, dtype=torch.bfloat16)
    y = torch.empty(512, 1024, dtype=torch.bfloat16)
    assert KernelOptions().grouped == "auto"
    for choice in dispatch.GROUPED_CHOICES:
        with kernel_options(grouped=choice):
            assert dispatch.use_grouped((x, values, y), 512) is None
    assert dispatch.grouped_design(64, "auto") == (2, {"BM": 256, "WS": False})
    assert dispatch.grouped_design(16, "auto") is None and dispatch.grouped_design(128, "auto") is None
    assert dispatch.grouped_design(64, "off") is None
    assert dispatch.grouped_design(16, "on") == (4, {"WS": False})
    assert dispatch.grouped_design(32, "ws") == (2, {"BM": 256, "WS": True})


def test_split_counts_fill_the_device_but_never_exceed_the_work():
    cpu = torch.device("cpu")  # counts as 4 SMs
    # prefill-sized inputs: split only while token tiles x block-rows leave SMs idle, at most K ways
    assert dispatch.split_slots(200, block_rows=1, k=3, block=64, elem_bytes=2, device=cpu) == 3
    assert dispatch.split_slots(200, block_rows=4, k=8, block=64, elem_bytes=2, device=cpu) == 1  # 8 tiles fill 4 SMs
    # decode: ~56 KB of weights a program (x B/32 above B = 32), whatever the device, at most 16 ways
    assert dispatch.split_slots(16, block_rows=256, k=448, block=16, elem_bytes=2, device=cpu) == 4
    assert dispatch.split_slots(16, block_rows=896, k=128, block=16, elem_bytes=2, device=cpu) == 1
    assert dispatch.split_slots(16, block_rows=128, k=224, block=32, elem_bytes=2, device=cpu) == 8
    assert dispatch.split_slots(16, block_rows=64, k=112, block=64, elem_bytes=2, device=cpu) == 8
    assert dispatch.split_slots(1, block_rows=32, k=56, block=128, elem_bytes=2, device=cpu) == 8
    assert dispatch.split_slots(16, block_rows=256, k=448, block=16, elem_bytes=4, device=cpu) == 8  # bytes, not slots
    assert dispatch.split_slots(8, block_rows=8, k=4096, block=16, elem_bytes=2, device=cpu) == 16
    assert dispatch.split_slots(8, block_rows=8, k=1, block=16, elem_bytes=2, device=cpu) == 1
    assert dispatch.split_tokens(programs=1, num_tokens=1000, device=cpu) == 1  # too few tokens to split
    assert dispatch.split_tokens(programs=1, num_tokens=4096, device=cpu) == 8


def test_tma_ws_routes_as_auto_does():
    """tma="ws" changes which configs the TMA kernels are tuned among, not where they run."""
    assert KernelOptions.from_env({"SPARSIFY_TMA": "WS"}).tma == "ws"
    x = torch.zeros(512, 256)
    values = torch.zeros(2, 2, 64, 64)
    for tma in ("auto", "ws"):
        with kernel_options(tma=tma):
            assert not dispatch.use_tma(x, values, 512)  # CPU tensors: no tensor descriptors either way


@pytest.mark.parametrize("tokens, block, dtype, expected", [
    (16, 16, torch.bfloat16, dispatch.DECODE_SMALL_BLOCK_TILE),
    (1, 32, torch.float16, dispatch.DECODE_SMALL_BLOCK_TILE),
    (17, 16, torch.bfloat16, None),  # more tokens than the tile was measured at: autotuned
    (16, 64, torch.bfloat16, None),  # larger blocks: the autotuned tile was as fast
    (16, 16, torch.float32, None),   # timed for 16-bit inputs only
])
def test_the_one_warp_decode_tile_is_forced_only_where_it_was_measured_faster(monkeypatch, tokens, block, dtype, expected):
    seen = []
    fake = types.SimpleNamespace(
        forward_gather=lambda x, values, col, bias, out, gather, **kw: seen.append(gather),
        reduce_partials=lambda partial, bias, y: None, check_columns=lambda col, num_cols: None)
    monkeypatch.setattr(dispatch, "_launchers", lambda: fake)
    monkeypatch.setattr(dispatch, "use_dense_weight", lambda *a: False)
    x = torch.randn(tokens, 4 * block).to(dtype)
    values = torch.randn(2, 2, block, block).to(dtype)
    col = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    dispatch.triton_forward(x, values, col, None)
    assert seen == [expected]
