"""The lean relaunch path (sparsify/kernels/launch.py), driven through a stand-in for Triton's launcher:
the first call goes through the kernel as usual, later calls hand the compiled kernel every argument
in signature order, and anything Triton would specialize differently gets its own entry. (On CPU no
real launch can run; tests/gpu/ checks the numbers on CUDA.)"""

import pytest
import torch
import triton

from sparsify import kernel_options
from sparsify.kernels import launch as lean
from sparsify.kernels.forward import _forward_kernel

CUDA = torch.device("cuda", 0)


class FakeCompiled:
    function, packed_metadata = "function-handle", "packed"

    def __init__(self):
        self.calls = []

    def run(self, *launch_args):
        self.calls.append(launch_args)


class FakeKernel:
    """Stands for an Autotuner: indexing by a grid launches through Triton and returns the compiled kernel."""

    def __init__(self, config, configs=None):
        self.fn = _forward_kernel.fn  # the real JITFunction: its parameter names and specializations
        self.best_config = config
        self.configs = configs if configs is not None else [config]
        self.compiled = FakeCompiled()
        self.launches = []

    def __getitem__(self, grid):
        def runner(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.compiled

        return runner


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(lean, "enabled", lambda: True)
    monkeypatch.setattr(lean, "_COMPILED", {})
    monkeypatch.setattr(lean, "_HOOKED", {})  # ids of dead fake kernels come back
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 4242, raising=False)


def forward_args(tokens: int, out_features: int, x: torch.Tensor):
    v, col, y = torch.zeros(4, 2, 16, 16), torch.zeros(4, 2, dtype=torch.int32), torch.zeros(tokens, out_features)
    return (x, v, col, y, y, y, col, tokens, 16, out_features, 64, 2, 4, 1, 4)


def test_a_relaunch_passes_every_argument_in_signature_order(enabled):
    kernel = FakeKernel(triton.Config({"BM": 64, "KSB": 32}, num_warps=4, num_stages=3))
    flags = dict(B=16, HAS_BIAS=False, PARTIAL=False, FUSED=False, PRECISION="ieee", UPCAST=False, X_BOXES=False)
    grid = lambda meta: (triton.cdiv(100, meta["BM"]) * 4, 1)  # noqa: E731
    args = forward_args(100, 64, torch.zeros(100, 64))
    lean.launch(kernel, grid, args, flags, CUDA)
    assert len(kernel.launches) == 1 and not kernel.compiled.calls  # first call: Triton's own path
    lean.launch(kernel, grid, args, flags, CUDA)
    assert len(kernel.launches) == 1
    (call,) = kernel.compiled.calls
    assert call[:9] == (8, 1, 1, 4242, "function-handle", "packed", None, None, None)
    assert call[9:24] == args
    assert call[24:] == (16, False, False, False, "ieee", False, 64, 32, False)  # in signature order
    assert _forward_kernel.fn.arg_names[15:] == ["B", "HAS_BIAS", "PARTIAL", "FUSED", "PRECISION", "UPCAST", "BM", "KSB",
                                                 "X_BOXES"]


def test_what_triton_specializes_on_gets_its_own_entry(enabled):
    kernel = FakeKernel(triton.Config({"BM": 64, "KSB": 32}, num_warps=4, num_stages=3))
    flags = dict(B=16, HAS_BIAS=False, PARTIAL=False, FUSED=False, PRECISION="ieee", UPCAST=False, X_BOXES=False)
    grid = (1, 1)
    storage = torch.zeros(6401)
    lean.launch(kernel, grid, forward_args(100, 64, storage[:6400].view(100, 64)), flags, CUDA)
    lean.launch(kernel, grid, forward_args(37, 64, storage[:2368].view(37, 64)), flags, CUDA)  # M: not specialized
    assert len(kernel.launches) == 1 and len(kernel.compiled.calls) == 1
    lean.launch(kernel, grid, forward_args(100, 128, storage[:6400].view(100, 64)), flags, CUDA)  # a new shape
    lean.launch(kernel, grid, forward_args(100, 64, storage[1:6401].view(100, 64)), flags, CUDA)  # misaligned x
    lean.launch(kernel, grid, forward_args(100, 64, storage[:6400].view(100, 64)), {**flags, "HAS_BIAS": True}, CUDA)
    assert len(kernel.launches) == 4


def test_configs_with_pre_hooks_and_cpu_tensors_always_take_tritons_path(enabled):
    kernel = FakeKernel(triton.Config({"BM": 64, "KSB": 32}, pre_hook=lambda nargs: None))
    flags = dict(B=16, HAS_BIAS=False, PARTIAL=False, FUSED=False, PRECISION="ieee", UPCAST=False, X_BOXES=False)
    args = forward_args(100, 64, torch.zeros(100, 64))
    for _ in range(2):
        lean.launch(kernel, (1,), args, flags, CUDA)
        lean.launch(kernel, (1,), args, flags, torch.device("cpu"))
    assert len(kernel.launches) == 4 and not kernel.compiled.calls


class Descriptor:
    """Stands for a TensorDescriptor: an argument that is no dictionary key."""

    __hash__ = None


def test_a_kernel_with_any_pre_hooked_config_never_builds_a_key_from_its_arguments(enabled):
    plain = triton.Config({"BM": 64, "KSB": 32})
    hooked = triton.Config({"BM": 128, "KSB": 32}, pre_hook=lambda nargs: None)
    kernel = FakeKernel(plain, configs=[plain, hooked])  # the autotuner picked the config without a hook
    flags = dict(B=16, HAS_BIAS=False, PARTIAL=False, FUSED=False, PRECISION="ieee", UPCAST=False, X_BOXES=False)
    args = (Descriptor(), *forward_args(100, 64, torch.zeros(100, 64))[1:])
    for _ in range(2):
        lean.launch(kernel, (1,), args, flags, CUDA)
    assert len(kernel.launches) == 2 and not kernel.compiled.calls and not lean._COMPILED


def test_the_lean_path_is_on_without_launch_hooks_and_off_with_one():
    assert lean.enabled()  # Triton's empty hook chains are no hooks
    hook = lambda metadata: None  # noqa: E731
    lean._knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not lean.enabled()
    finally:
        lean._knobs.runtime.launch_enter_hook.remove(hook)
    with kernel_options(lean_launch=False):
        assert not lean.enabled()
    assert lean.enabled()
