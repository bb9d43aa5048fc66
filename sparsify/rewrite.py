"""Turn selected linears into Block-ELL layers: the step the module path and the graph pass share."""

from __future__ import annotations

import torch

from sparsify import block_ell
from sparsify.config import BlockSparseConfig
from sparsify.layer import BlockSparseLinear
from sparsify.select import Target, linear_weight


def to_block_sparse(targets: list[Target], config: BlockSparseConfig) -> list[BlockSparseLinear]:
    """Build the Block-ELL layer for every target; raises (naming the layer) before anything changes.
    One generator (seeded by ``config.seed``) serves all targets in order, so ``init="random"`` layers
    differ from each other but repeat across runs."""
    for target in targets:
        out_features, in_features = linear_weight(target.module).shape
        block_ell.check_block_shape(in_features, out_features, config.block_size, target.fqn)
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    return [
        BlockSparseLinear.from_linear(
            target.module, generator=generator, config=config, weight=linear_weight(target.module), name=target.fqn
        )
        for target in targets
    ]
