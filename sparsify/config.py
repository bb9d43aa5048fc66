"""BlockSparseConfig: how a linear is cut into blocks, validated once and stored with the model.

    config = BlockSparseConfig(density=0.5, block_size=16)
    sparsify(model, config, layers="8..12", components="mlp")   # or the same fields as keywords
    BlockSparseConfig.from_dict(config.to_dict()) == config        # what config.json stores

Frozen and versioned (torchao's ``AOBaseConfig`` is the model): a saved model says how it was made,
and a newer library reads an older file. Every entry point (``sparsify``, the graph pass,
``to_block_sparse``, ``BlockSparseLinear.from_linear``) takes one and validates nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

INIT_METHODS = ("magnitude", "random")


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
    """density: fraction of blocks kept per block-row, in (0, 1] (``K = max(1, round(C * density))``).
    block_size: B, both dimensions of a selected linear must be multiples of it.
    init: ``"magnitude"`` keeps each row's K largest blocks of the dense weight, ``"random"`` draws K columns.
    seed: seeds ``init="random"`` (None: torch's global generator)."""

    density: float = 0.5
    block_size: int = 16
    init: str = "magnitude"
    seed: int | None = None

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        where = "BlockSparseConfig"
        density = self.density
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise ValueError(f"{where}: density={density!r} must be a number in (0, 1], e.g. density=0.5")
        if math.isnan(density) or not 0.0 < density <= 1.0:
            raise ValueError(
                f"{where}: density={density!r} is outside (0, 1]; pass the fraction of blocks to keep, e.g. density=0.5"
            )
        block = self.block_size
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{where}: block_size={block!r} must be a positive integer such as 16, 32 or 64")
        if self.init not in INIT_METHODS:
            raise ValueError(f"{where}: init={self.init!r} is not one of {INIT_METHODS}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: seed={seed!r} must be an integer or None")
        object.__setattr__(self, "density", float(density))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the format version."""
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlockSparseConfig":
        """The inverse of ``to_dict``; refuses unknown fields and versions newer than this library's."""
        if not isinstance(data, dict):
            raise ValueError(f"BlockSparseConfig.from_dict: expected a dict such as config.to_dict(), got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(
                f"BlockSparseConfig: version {version!r} is newer than this library reads ({cls.VERSION}); "
                "upgrade sparsify to load this model"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BlockSparseConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def resolve(cls, config: "BlockSparseConfig | None" = None, **overrides: Any) -> "BlockSparseConfig":
        """``config`` (or the defaults) with the keyword arguments that are not None applied: how the
        entry points accept either a config or the old keywords."""
        if config is not None and not isinstance(config, cls):
            raise ValueError(
                f"config={config!r} ({type(config).__name__}) is not a BlockSparseConfig; pass "
                "BlockSparseConfig(density=..., block_size=...) or the fields as keywords (density=0.5), "
                "and BlockSparseConfig.from_dict(...) for a saved dict"
            )
        given = {name: value for name, value in overrides.items() if value is not None}
        return dataclasses.replace(config or cls(), **given)
