"""The Block-ELL format: a weight ``W [out, in]`` cut into ``B x B`` blocks, of which each
block-row keeps exactly ``K`` (its *slots*).

    values:      [R, K, B, B]   values[r, k, i, j] = W[r*B + i, col_indices[r, k]*B + j]
    col_indices: [R, K] int32   the *topology*: which block-column each slot holds, unique per row

with ``R = out / B`` block-rows and ``C = in / B`` block-columns. Everything here is a pure
function of tensors; layers, passes and the topology optimizer all build on it.
"""

from __future__ import annotations


import torch

from sparsify.config import INIT_METHODS


def blocks_per_row(num_cols: int, density: float) -> int:
    """K for a block-row of ``num_cols`` columns: ``max(1, round(C * density))``, at most C."""
    return min(num_cols, max(1, round(num_cols * density)))


def check_block_shape(in_features: int, out_features: int, block_size: int, where: str) -> None:
    """Raise a ValueError unless both dimensions are positive multiples of ``block_size``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size={block_size!r} must be a positive integer such as 16, 32 or 64")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size <= 0 or size % block_size:
            raise ValueError(
                f"{where}: {name}={size} is not divisible by block_size={block_size}; "
                f"choose a block_size that divides {size} or exclude this layer"
            )


def check_col_indices(col_indices: torch.Tensor, num_cols: int, where: str) -> None:
    """Raise a ValueError unless ``col_indices`` is an integer [R, K] topology with every entry in
    [0, C) and no column repeated within a row."""
    if col_indices.dim() != 2 or col_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{where}: col_indices must be an int32 tensor of shape [R, K], got "
            f"{col_indices.dtype} of shape {tuple(col_indices.shape)}"
        )
    if col_indices.numel() == 0:
        return
    low, high = int(col_indices.min()), int(col_indices.max())
    if low < 0 or high >= num_cols:
        raise ValueError(
            f"{where}: col_indices hold values in [{low}, {high}] but must lie in [0, {num_cols}) "
            f"(the layer has {num_cols} block-columns); the topology is corrupt or belongs to another layer"
        )
    ordered = col_indices.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(
            f"{where}: block-row {row} repeats a column in col_indices ({col_indices[row].tolist()}); "
            f"each column may appear at most once per row"
        )


def block_norms(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Frobenius norm of every block of a dense weight: ``[out, in] -> [R, C]``."""
    out_features, in_features = weight.shape
    rows, cols = out_features // block_size, in_features // block_size
    tiles = weight.detach().float().reshape(rows, block_size, cols, block_size)
    return tiles.pow(2).sum(dim=(1, 3)).sqrt()


def choose_topology(
    weight: torch.Tensor,
    block_size: int,
    density: float,
    init: str = "magnitude",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick K columns per block-row; returns ``col_indices [R, K]`` int32, sorted within each row.

    ``magnitude`` keeps the K blocks of largest Frobenius norm (ties go to the lowest column);
    ``random`` draws K distinct columns per row from ``generator``. A weight on the meta device has
    no data to rank, so the result is a meta tensor of the right shape: the layer chooses its topology
    when its storage is materialized (``BlockSparseLinear.reset_parameters``) or loaded.
    """
    out_features, in_features = weight.shape
    rows, cols = out_features // block_size, in_features // block_size
    k = blocks_per_row(cols, density)
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is not one of {INIT_METHODS}")
    if weight.is_meta:
        return torch.empty(rows, k, dtype=torch.int32, device="meta")
    if init == "magnitude":
        norms = block_norms(weight, block_size).cpu()
        # A stable sort on the negated norms ranks equal norms by column, lowest first.
        order = torch.sort(-norms, dim=1, stable=True).indices
        chosen = order[:, :k]
    elif init == "random":
        noise = torch.rand(rows, cols, generator=generator)
        chosen = noise.argsort(dim=1)[:, :k]
    return chosen.sort(dim=1).values.to(torch.int32).to(weight.device)


def gather_blocks(weight: torch.Tensor, col_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """The blocks of a dense weight named by the topology: ``[out, in] -> values [R, K, B, B]``."""
    out_features, in_features = weight.shape
    rows, cols = out_features // block_size, in_features // block_size
    tiles = weight.reshape(rows, block_size, cols, block_size).permute(0, 2, 1, 3)  # [R, C, B, B]
    index = col_indices.long()[:, :, None, None].expand(-1, -1, block_size, block_size)
    return torch.gather(tiles, 1, index).contiguous()


def to_dense(values: torch.Tensor, col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight ``[out, in]`` a Block-ELL pair stands for, zeros outside the kept blocks.

    Slots that repeat a column in one row are summed, as the kernels do (they add every slot's
    product), so this view and the layer's output agree even on a topology ``check_col_indices``
    would reject."""
    rows, k, block_size, _ = values.shape
    cols = in_features // block_size
    tiles = values.new_zeros(rows, cols, block_size, block_size)
    index = col_indices.long()[:, :, None, None].expand(-1, -1, block_size, block_size)
    tiles = tiles.scatter_add(1, index, values)
    return tiles.permute(0, 2, 1, 3).reshape(rows * block_size, in_features)


def block_mask(col_indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Which blocks are active: ``[R, K] -> bool [R, C]``."""
    mask = torch.zeros(col_indices.shape[0], num_cols, dtype=torch.bool, device=col_indices.device)
    return mask.scatter(1, col_indices.long(), True)


def dense_mask(col_indices: torch.Tensor, num_cols: int, block_size: int) -> torch.Tensor:
    """The element mask of the dense weight: ``bool [out, in]``."""
    mask = block_mask(col_indices, num_cols)
    return mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
