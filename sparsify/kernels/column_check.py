"""A device-side check that every column index is in [0, C), without a host synchronization.

The kernels never read outside their operands whatever ``col_indices`` holds (a slot whose column is
outside [0, C) reads nothing and adds nothing), but such a topology is a bug upstream (a corrupted
checkpoint, a narrower input), so it must not pass silently. Checking on the host would synchronize
every call; instead one kernel clears a flag where any index is out of range and
``torch._assert_async`` fails on it: on CUDA a device-side assert (reported at a later
synchronization; the CUDA context is lost, as for any device-side assert), on CPU tensors under
the interpreter a RuntimeError at once. Cost: three launches (the flag's fill, the check, the assert).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import cdiv
from sparsify.kernels.launch import launch

CHECK_CHUNK = 1024


@triton.jit
def _column_check_kernel(col_ptr, ok_ptr, TOTAL, C, CHUNK: tl.constexpr):
    """ok = 0 where any of the flat indices [pid*CHUNK, pid*CHUNK + CHUNK) is outside [0, C)."""
    s = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(col_ptr + s, mask=s < TOTAL, other=0)
    bad = tl.sum(((v < 0) | (v >= C)).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(ok_ptr, 0)  # every failing program writes the same value: no atomics needed


def check_columns(col: torch.Tensor, num_cols: int) -> None:
    """Assert on col's device that every entry of col (int32 [R, K]) is in [0, num_cols)."""
    flat = col.reshape(-1)
    ok = torch.ones(1, dtype=torch.int32, device=col.device)
    launch(_column_check_kernel, (max(1, cdiv(flat.numel(), CHECK_CHUNK)),), (flat, ok, flat.numel(), num_cols),
           dict(CHUNK=CHECK_CHUNK), col.device)
    torch._assert_async(ok, f"col_indices hold a column outside [0, {num_cols}): the topology is corrupt or the "
                            "input is narrower than in_features")
