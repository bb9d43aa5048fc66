"""Turn selected linears into Block-ELL layers: the step the module path and the graph pass share."""

from __future__ import annotations

import warnings

import torch

from sparsify import block_ell
from sparsify.config import BlockSparseConfig
from sparsify.integrations.transformers import linear_weight
from sparsify.layer import BlockSparseLinear
from sparsify.select import Target

DENSITY_TOLERANCE = 0.05  # a layer whose K / C differs from the requested density by more is warned about
_NAMED = 8  # layers a density warning names before it abbreviates


def to_block_sparse(targets: list[Target], config: BlockSparseConfig) -> list[BlockSparseLinear]:
    """Build the Block-ELL layer for every target; raises (naming the layer) before anything changes.
    One generator (seeded by ``config.seed``) serves all targets in order, so ``init="random"`` layers
    differ from each other but repeat across runs. Warns, naming the layers, where the density used
    (``K / C`` with ``K = max(1, round(C * density))``) is more than 0.05 off the request."""
    for target in targets:
        out_features, in_features = linear_weight(target.module).shape
        block_ell.check_block_shape(in_features, out_features, config.block_size, target.fqn)
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    layers = [
        BlockSparseLinear.from_linear(
            target.module, generator=generator, config=config, weight=linear_weight(target.module), name=target.fqn
        )
        for target in targets
    ]
    _warn_about_rounded_density(targets, layers, config.density)
    return layers


def _warn_about_rounded_density(targets: list[Target], layers: list[BlockSparseLinear], requested: float) -> None:
    off = [
        f"{t.fqn} {layer.density:.3f} ({layer.blocks_per_row}/{layer.num_cols} blocks)"
        for t, layer in zip(targets, layers)
        if abs(layer.density - requested) > DENSITY_TOLERANCE
    ]
    if off:
        more = f" and {len(off) - _NAMED} more" if len(off) > _NAMED else ""
        warnings.warn(
            f"sparsify: density={requested} was requested, but K = max(1, round(C * density)) blocks per block-row "
            f"gives {', '.join(off[:_NAMED])}{more}; choose a smaller block_size or a density that is a multiple "
            "of 1/C to get closer",
            UserWarning,
            stacklevel=3,
        )
