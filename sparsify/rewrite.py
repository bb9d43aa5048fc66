"""Turn selected linears into Block-ELL layers: the step the module path and the graph pass share."""

from __future__ import annotations

import torch

from sparsify import block_ell
from sparsify.layer import BlockSparseLinear
from sparsify.select import Target, linear_weight


def check_arguments(density: float, block_size: int, init: str) -> None:
    """Validate the arguments every rewrite shares, before anything is touched."""
    block_ell.check_density(density, "sparsify")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"sparsify: block_size={block_size!r} must be a positive integer such as 16, 32 or 64")
    if init not in block_ell.INIT_METHODS:
        raise ValueError(f"sparsify: init={init!r} is not one of {block_ell.INIT_METHODS}")


def to_block_sparse(
    targets: list[Target], density: float, block_size: int, init: str, seed: int | None
) -> list[BlockSparseLinear]:
    """Build the Block-ELL layer for every target; raises (naming the layer) before anything changes."""
    for target in targets:
        out_features, in_features = linear_weight(target.module).shape
        block_ell.check_block_shape(in_features, out_features, block_size, target.fqn)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return [
        BlockSparseLinear.from_linear(
            target.module, block_size, density, init, generator, weight=linear_weight(target.module), name=target.fqn
        )
        for target in targets
    ]
