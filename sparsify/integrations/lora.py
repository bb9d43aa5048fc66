"""LoRA (peft) adapters on top of BlockSparseLinear layers.

    from peft import LoraConfig, get_peft_model
    from sparsify.integrations.lora import with_block_sparse
    model = get_peft_model(model, with_block_sparse(LoraConfig(r=8, target_modules=["up_proj", "q_proj"])))

peft wraps only the layer types it knows; ``with_block_sparse`` registers :class:`BlockSparseLoraLinear`
for ``BlockSparseLinear`` through peft's custom-module mechanism (``LoraConfig._register_custom_module``).
Without it, a ``target_modules`` entry naming a sparse layer fails with peft's
``Target module BlockSparseLinear(...) is not supported``. ``target_modules="all-linear"`` matches
``nn.Linear`` / ``Conv1D`` only: sparse layers are skipped silently, so name them explicitly.

The adapter stays unmerged: ``B @ A`` is dense and the layer keeps K of C blocks per row, so merging
it would either drop part of the update or densify the layer. ``merge`` / ``merge_and_unload``
raise and say so; DoRA and the other LoRA variants are not supported on sparse layers.
"""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from sparsify.layer import BlockSparseLinear


class BlockSparseLoraLinear(LoraLinear):
    """``y = base(x) + lora_B(lora_A(dropout(x))) * scaling`` with a BlockSparseLinear ``base``; the
    base layer (and its topology) is frozen and untouched, only ``lora_A`` / ``lora_B`` train."""

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA only: the variants read or rewrite the dense base weight

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            f"{type(self.base_layer).__name__}: a LoRA adapter cannot be merged into a block-sparse layer (B @ A is "
            "dense, the layer keeps only its K blocks per row); keep the adapter unmerged, or call "
            "sparsify.densify(model.base_model.model) first and merge into the dense layers"
        )


def with_block_sparse(config: LoraConfig) -> LoraConfig:
    """``config`` with BlockSparseLinear registered as a LoRA target type; returns the same object."""
    config._register_custom_module({BlockSparseLinear: BlockSparseLoraLinear})
    return config
