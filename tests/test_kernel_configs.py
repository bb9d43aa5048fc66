"""Where first-call tuning is skipped (small problems), the one tile config launched untimed must fit in
shared memory in every dtype, block size and token count: nothing would catch Triton's out-of-resources
error at launch (an H100 run hit it with float32 64x64 blocks before this rule existed)."""

import pytest
import torch

from sparsify.kernels import backward, forward, forward_tma, tiles
from sparsify.kernels.common import SAFE_SMEM_BYTES

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
    assert (c.kwargs["BM"] + block) * c.kwargs["KSB"] * elem * c.num_stages <= SAFE_SMEM_BYTES
    c = single(backward._prune_grad_input, backward._grad_input_kernel.configs, args)
    assert (c.kwargs["BM"] + block) * c.kwargs["TSB"] * elem * c.num_stages <= SAFE_SMEM_BYTES
    c = single(backward._prune_grad_values, backward._grad_values_kernel.configs, args)
    assert (c.kwargs["GSB"] + block) * c.kwargs["BM"] * elem * c.num_stages <= SAFE_SMEM_BYTES
    c = single(forward_tma._prune_tma, forward_tma._forward_tma_kernel.configs, args)
    assert (c.kwargs["BM"] + block) * c.kwargs["KC"] * elem * c.num_stages <= SAFE_SMEM_BYTES
    if block <= 64:
        c = single(tiles._tile_kernel.early_config_prune, tiles._tile_kernel.configs, args)
        assert (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"] * elem * c.num_stages <= SAFE_SMEM_BYTES
        kernel = backward._tile_grad_values_kernel
        c = single(kernel.early_config_prune, kernel.configs, args)
        assert (c.kwargs["BO"] + c.kwargs["BI"]) * c.kwargs["BT"] * elem * c.num_stages <= SAFE_SMEM_BYTES


def test_the_float32_64x64_grad_values_config_that_failed_on_the_h100_is_no_longer_chosen():
    args = dict(SMALL, B=64, M_BUCKET=8192, ELEM_BYTES=4)
    c = single(backward._prune_grad_values, backward._grad_values_kernel.configs, args)
    assert (c.kwargs["BM"], c.kwargs["GSB"], c.num_stages) != (64, 256, 3)  # asked for 240 KB at launch
