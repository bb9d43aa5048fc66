"""Where first-call tuning is skipped (small problems), the one tile config launched untimed must fit in
shared memory in every dtype, block size and token count: nothing would catch Triton's out-of-resources
error at launch (an H100 run hit it with float32 64x64 blocks before this rule existed)."""

import pytest
import torch

from sparsify.kernels import forward, forward_tma, grad_input, grad_values, tiles
from sparsify.kernels.common import SMEM_BUDGET

ELEMENT = {torch.bfloat16: 2, torch.float32: 4}
SMALL = dict(N_OUT=64, N=64, IN_F=64, KD=64, K=1)  # small enough that tune_one_config keeps one config


def single(pruner, configs, args):
    chosen = pruner(configs, args)
    assert len(chosen) == 1
    return chosen[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bucket", [1, 16, 256, 4096])
def test_the_untimed_config_of_every_kernel_fits_in_shared_memory(dtype, block, bucket):
    elem = ELEMENT[dtype]
    args = dict(SMALL, B=block, M_BUCKET=bucket, ELEM_BYTES=elem, x_ptr=torch.empty(1, dtype=dtype))
    c = single(forward._prune_configs, forward._forward_kernel.configs, args)
    assert (c.kwargs["BM"] + block) * c.kwargs["KSB"] * elem * c.num_stages <= SMEM_BUDGET
    c = single(grad_input._prune_grad_input, grad_input._grad_input_kernel.configs, args)
    assert (c.kwargs["BM"] + block) * c.kwargs["TSB"] * elem * c.num_stages <= SMEM_BUDGET
    c = single(grad_values._prune_grad_values, grad_values._grad_values_kernel.configs, args)
    assert (c.kwargs["GSB"] + block) * c.kwargs["BM"] * elem * c.num_stages <= SMEM_BUDGET
    for kernel in (forward_tma._forward_tma_kernel, forward_tma._forward_tma_persistent_kernel):
        c = single(forward_tma._prune_tma, kernel.configs, args)
        assert (c.kwargs["BM"] + block) * c.kwargs["KC"] * elem * c.num_stages <= SMEM_BUDGET
    if block <= 64:
        c = single(tiles._tile_kernel.early_config_prune, tiles._tile_kernel.configs, args)
        assert (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"] * elem * c.num_stages <= SMEM_BUDGET
        kernel = grad_values._tile_grad_values_kernel
        c = single(kernel.early_config_prune, kernel.configs, args)
        assert (c.kwargs["BO"] + c.kwargs["BI"]) * c.kwargs["BT"] * elem * c.num_stages <= SMEM_BUDGET


def test_float32_64x64_grad_values_never_takes_the_config_that_needs_240_kb_of_shared_memory():
    args = dict(SMALL, B=64, M_BUCKET=8192, ELEM_BYTES=4)
    c = single(grad_values._prune_grad_values, grad_values._grad_values_kernel.configs, args)
    assert (c.kwargs["BM"], c.kwargs["GSB"], c.num_stages) != (64, 256, 3)  # asked for 240 KB at launch


def test_warp_specialized_tma_configs_are_opt_in_and_timed_for_16_bit_operands_only():
    """Triton 3.6 fails to compile the WS loops for float32 (tf32) operands on sm_90, with an error the
    autotuner does not catch: a float32 call must never see one; and none is in a default table."""
    from sparsify.kernels import grad_input_tma, grad_values_tma

    large = dict(N_OUT=4096, N=4096, IN_F=4096, KD=4096, K=16, B=128, M_BUCKET=8192)
    kernels = [(forward_tma._prune_tma, forward_tma._forward_tma_ws_kernel, forward_tma._forward_tma_kernel),
               (grad_input_tma._prune, grad_input_tma._grad_input_tma_ws_kernel, grad_input_tma._grad_input_tma_kernel),
               (grad_values_tma._prune, grad_values_tma._grad_values_tma_ws_kernel, grad_values_tma._grad_values_tma_kernel)]
    for prune, kernel, default in kernels:
        assert not any(c.kwargs["WS"] for c in default.configs)  # opt-in (tma="ws") until timed on a GPU
        assert any(c.kwargs["WS"] for c in kernel.configs)
        assert any(c.kwargs["WS"] for c in prune(kernel.configs, dict(large, ELEM_BYTES=2)))
        assert not any(c.kwargs["WS"] for c in prune(kernel.configs, dict(large, ELEM_BYTES=4)))
