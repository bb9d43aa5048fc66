"""Plain PyTorch Block-ELL forward and backward: the CPU path and the ground truth of every test.

Shapes (M tokens, R block-rows, K slots, C block-columns, B block size):
    x:           [M, C*B]        grad_out: [M, R*B]
    values:      [R, K, B, B]    col_indices: [R, K] int
The work scales with K, not C: each slot gathers its [M, B] activation box and multiplies it
with its [B, B] block. Tokens are processed in chunks so the gathered boxes stay bounded.
Accumulation is in float32 (float64 inputs stay float64); outputs take the input dtype.
"""

from __future__ import annotations

import functools

import torch

_CHUNK_ELEMENTS = 1 << 24  # gathered elements per token chunk: [m, R, K, B] stays under 64 MB in fp32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_chunks(num_tokens: int, elements_per_token: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_token))
    for start in range(0, num_tokens, step):
        yield slice(start, min(num_tokens, start + step))


def _without_autocast(fn):
    """The reference computes in the dtypes it chooses: an ambient torch.autocast (a backward called
    inside one, or the eager route's forward) must not turn its float32 einsums into bfloat16."""

    @functools.wraps(fn)
    def wrapped(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapped


@_without_autocast
def forward(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, bias: torch.Tensor | None, *, out=None
) -> torch.Tensor:
    """y = x W^T + bias for x [M, in]: returns [M, out] in x's dtype (written into ``out`` if given)."""
    block_rows, k, block_size, _ = values.shape
    num_tokens, in_features = x.shape
    acc = _compute_dtype(x.dtype)
    blocks = values.to(acc)
    index = col_indices.long()
    y = torch.empty(num_tokens, block_rows * block_size, dtype=x.dtype, device=x.device) if out is None else out
    for part in _token_chunks(num_tokens, values[..., 0].numel()):
        x3 = x[part].to(acc).view(-1, in_features // block_size, block_size)  # [m, C, B]
        boxes = x3[:, index]  # [m, R, K, B]
        y_part = torch.einsum("mrkj,rkij->mri", boxes, blocks)  # [m, R, B]
        if bias is not None:
            y_part = y_part + bias.to(acc).view(block_rows, block_size)
        y[part] = y_part.reshape(-1, block_rows * block_size).to(x.dtype)
    return y


@_without_autocast
def grad_input(grad_out: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """dL/dx = grad_out W for grad_out [M, out]: returns [M, in] in grad_out's dtype."""
    block_rows, k, block_size, _ = values.shape
    num_tokens = grad_out.shape[0]
    acc = _compute_dtype(grad_out.dtype)
    blocks = values.to(acc)
    flat_index = col_indices.long().reshape(-1)
    grad_x = torch.empty(num_tokens, in_features, dtype=grad_out.dtype, device=grad_out.device)
    for part in _token_chunks(num_tokens, values[..., 0].numel()):
        g3 = grad_out[part].to(acc).view(-1, block_rows, block_size)  # [m, R, B]
        per_slot = torch.einsum("mri,rkij->mrkj", g3, blocks).reshape(g3.shape[0], block_rows * k, block_size)
        gx = torch.zeros(g3.shape[0], in_features // block_size, block_size, dtype=acc, device=grad_out.device)
        gx.index_add_(1, flat_index, per_slot)  # every slot adds into its own column
        grad_x[part] = gx.reshape(-1, in_features).to(grad_out.dtype)
    return grad_x


@_without_autocast
def grad_values(grad_out: torch.Tensor, x: torch.Tensor, col_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """dL/dvalues: grad_out^T x sampled at the kept blocks, [R, K, B, B] in grad_out's dtype."""
    num_tokens, in_features = x.shape
    block_rows = grad_out.shape[1] // block_size
    k = col_indices.shape[1]
    acc = _compute_dtype(grad_out.dtype)
    index = col_indices.long()
    total = torch.zeros(block_rows, k, block_size, block_size, dtype=acc, device=x.device)
    for part in _token_chunks(num_tokens, block_rows * k * block_size):
        g3 = grad_out[part].to(acc).view(-1, block_rows, block_size)  # [m, R, B]
        boxes = x[part].to(acc).view(-1, in_features // block_size, block_size)[:, index]  # [m, R, K, B]
        total += torch.einsum("mri,mrkj->rkij", g3, boxes)
    return total.to(grad_out.dtype)
