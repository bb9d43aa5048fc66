"""BlockSparseLinear: an ``nn.Linear`` whose weight is stored, trained and multiplied in Block-ELL form."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsify import block_ell
from sparsify.config import BlockSparseConfig
from sparsify.functional import block_ell_linear
from sparsify.integrations.transformers import is_conv1d_type


class BlockSparseLinear(nn.Module):
    """A linear layer that keeps K of every C weight blocks per block-row.

    Attributes:
        values: ``nn.Parameter [R, K, B, B]``, ``values[r, k, i, j] = W[r*B + i, col_indices[r, k]*B + j]``.
        col_indices: int32 buffer ``[R, K]``, the topology; unique within a row.
        bias: ``nn.Parameter [out_features]`` or None.
        stats_probe: non-persistent float32 buffer ``[R + C]``; when it requires grad (the topology
            optimizer turns it on) its ``.grad`` collects per-row error and per-column activation energy.
        config: the :class:`BlockSparseConfig` the layer was made with (saved with the model).

    Example::

        >>> layer = BlockSparseLinear(64, 128, block_size=16, density=0.5)
        >>> layer(torch.randn(3, 64)).shape
        torch.Size([3, 128])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int = 16,
        density: float = 0.5,
        bias: bool = True,
        *,
        init: str = "random",
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        config = BlockSparseConfig(density=density, block_size=block_size, init=init)
        block_ell.check_block_shape(in_features, out_features, block_size, f"BlockSparseLinear({in_features}, {out_features})")
        rows, cols = out_features // block_size, in_features // block_size
        k = block_ell.blocks_per_row(cols, density)
        factory = {"device": device, "dtype": dtype}
        self._set_state(
            config, in_features,
            values=torch.empty(rows, k, block_size, block_size, **factory),
            bias=torch.empty(out_features, **factory) if bias else None,
            col_indices=torch.zeros(rows, k, dtype=torch.int32, device=device),
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialize the layer as a fresh one: ``nn.Linear``'s init (Kaiming-uniform weight, uniform
        bias in +-1/sqrt(in_features)) on the dense weight the blocks are cut from, the topology chosen
        from it by ``config.init``, ``stats_probe`` zeroed.

        ``generator`` defaults to one seeded by ``config.seed``, else torch's global generator. The
        scratch dense weight is drawn on the CPU (one ``[out, in]`` float32 tensor), so a seed gives
        the same layer on every device. Does nothing on the meta device (there is no storage yet);
        ``to_empty()`` calls it once the storage exists (see ``_apply``).
        """
        if self.values.is_meta:
            return
        if generator is None and self.config.seed is not None:
            generator = torch.Generator().manual_seed(self.config.seed)
        dense = torch.empty(self.out_features, self.in_features, device="cpu")
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            topology = block_ell.choose_topology(dense, self.block_size, self.density, self.config.init, generator)
            self.col_indices.copy_(topology)
            self.values.copy_(block_ell.gather_blocks(dense, topology, self.block_size))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.copy_(torch.empty(self.out_features, device="cpu").uniform_(-bound, bound, generator=generator))
            self.stats_probe.zero_()

    def _apply(self, fn, recurse: bool = True):
        # to_empty() (and FSDP2 / accelerate materializing a meta model) hand the layer uninitialized
        # storage. HF's init_weights() and most models' init code do not know this module, so the
        # layer initializes itself the moment it leaves the meta device: col_indices then always
        # hold a valid topology, never leftover memory. Sharded (DTensor) values are left to the
        # caller, who must call reset_parameters on the full tensors.
        was_meta = self.values.is_meta or self.col_indices.is_meta  # accelerate's init_empty_weights: values only
        result = super()._apply(fn, recurse)
        materialized = not (self.values.is_meta or self.col_indices.is_meta)
        if was_meta and materialized and type(self.values.data) is torch.Tensor:
            self.reset_parameters()
        return result

    @property
    def num_rows(self) -> int:
        """R, the number of block-rows."""
        return self.values.shape[0]

    @property
    def num_cols(self) -> int:
        """C, the number of block-columns."""
        return self.in_features // self.block_size

    @property
    def blocks_per_row(self) -> int:
        """K, the active blocks (slots) per block-row."""
        return self.values.shape[1]

    @property
    def density(self) -> float:
        """K / C, the fraction of blocks kept."""
        return self.blocks_per_row / self.num_cols

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        block_size: int | None = None,
        density: float | None = None,
        init: str | None = None,
        generator: torch.Generator | None = None,
        *,
        config: BlockSparseConfig | None = None,
        weight: torch.Tensor | None = None,
        name: str = "linear",
    ) -> "BlockSparseLinear":
        """Cut an ``nn.Linear`` (or any module with ``weight [out, in]`` and ``bias``) into blocks.

        ``config`` (or the keywords, which override its fields) says how; ``weight`` overrides the
        module's weight (GPT-2's ``Conv1D`` stores it transposed). The result lives on the source's
        device and dtype; ``config.init`` picks the kept blocks. ``generator`` draws ``init="random"``
        (default: one seeded by ``config.seed``, else torch's global generator).
        """
        config = BlockSparseConfig.resolve(config, block_size=block_size, density=density, init=init)
        block_size, density, init = config.block_size, config.density, config.init
        if generator is None and config.seed is not None:
            generator = torch.Generator().manual_seed(config.seed)
        dense = linear.weight if weight is None else weight
        out_features, in_features = dense.shape
        block_ell.check_block_shape(in_features, out_features, block_size, name)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.source_type = type(linear)  # what densify rebuilds (GPT-2's Conv1D stores its weight transposed)
        with torch.no_grad():
            topology = block_ell.choose_topology(dense, block_size, density, init, generator)
            bias = getattr(linear, "bias", None)
            layer._set_state(
                config, in_features,
                values=block_ell.gather_blocks(dense.detach(), topology, block_size).clone(),
                bias=bias.detach().clone() if bias is not None else None,
                col_indices=topology,
            )
        return layer

    def _set_state(self, config: BlockSparseConfig, in_features: int, *, values, bias, col_indices) -> None:
        """Register parameters and buffers (both constructors end here, so they hold the same state).
        ``topology_version`` counts writes of ``col_indices`` (decisions, loads): caches derived from
        the topology key on it."""
        rows, _, block_size, _ = values.shape
        self.in_features, self.out_features, self.block_size = in_features, rows * block_size, block_size
        self.config = config
        self.values = nn.Parameter(values)  # [R, K, B, B]
        self.bias = nn.Parameter(bias) if bias is not None else None  # [out]
        self.register_buffer("col_indices", col_indices)  # [R, K] int32
        cols = in_features // block_size
        # [R + C] float32 (a TopologyOptimizer may make it float64); not saved: it is per-step scratch
        self.register_buffer(
            "stats_probe", torch.zeros(rows + cols, dtype=torch.float32, device=values.device), persistent=False
        )
        self.topology_version = 0

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[out, in]``, zeros outside the kept blocks (differentiable in ``values``)."""
        return block_ell.to_dense(self.values, self.col_indices, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """A dense ``[out, in]`` copy of the weight for code that reads ``module.weight`` (T5's dtype
        check, ``nn.MultiheadAttention`` passing ``out_proj.weight`` to its functional form, GPT-2's
        init, ``resize_token_embeddings``).

        Read-only and built on demand: every access runs :meth:`to_dense`, allocating ``out * in``
        elements (what the dense layer would hold) and scattering the K blocks of each row into it;
        gradients flow back to ``values``. It is not a parameter or buffer: ``state_dict``,
        ``named_parameters``, optimizers, the topology optimizer and ``densify`` never see it, and
        writing into it (``init.normal_(layer.weight)``) changes a temporary, not the layer.
        """
        return self.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the zero-filled dense weight, on the same device and dtype."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def to_dense_module(self) -> nn.Module:
        """The dense module this layer stands for, as it was before ``sparsify``: a GPT-2 style ``Conv1D``
        (weight ``[in, out]``) for a layer cut from one, so a densified checkpoint loads into stock
        transformers; else :meth:`to_linear`."""
        source = getattr(self, "source_type", nn.Linear)
        if not is_conv1d_type(source):
            return self.to_linear()
        conv = source(self.out_features, self.in_features)  # Conv1D(nf=out, nx=in)
        conv.to(device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense().t())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
            else:
                conv.bias = None
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.stats_probe
        return block_ell_linear(
            x, self.values, self.col_indices, self.bias, probe if probe.requires_grad else None,
            in_features=self.in_features,
        )

    def check_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Raise a ValueError, naming the layer, unless the entries ``prefix + "col_indices"`` and
        ``prefix + "values"`` of ``state_dict`` (where present) fit this layer: the same shapes, and a
        topology with every column in [0, C) and none repeated within a row. Changes nothing."""
        where = prefix.rstrip(".") or "BlockSparseLinear"
        for name, own in (("col_indices", self.col_indices), ("values", self.values)):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and tuple(incoming.shape) != tuple(own.shape):
                raise ValueError(
                    f"{where}: checkpoint {name} have shape {tuple(incoming.shape)} but this layer has "
                    f"{tuple(own.shape)}; sparsify the model with the same density and block_size first"
                )
        topology = state_dict.get(prefix + "col_indices")
        if topology is not None:
            block_ell.check_col_indices(topology, self.num_cols, where)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self.check_state_dict(state_dict, prefix)
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "col_indices" in state_dict and len(error_msgs) == errors_before:
            self.topology_version += 1

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"blocks_per_row={self.blocks_per_row}/{self.num_cols} (density={self.density:.3f}), "
            f"bias={self.bias is not None}"
        )


def _check_sparse_entries(root: nn.Module, state_dict, prefix, *_hook_args) -> None:
    for name, layer in root.named_modules():
        if isinstance(layer, BlockSparseLinear):
            layer.check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)


def guard_state_dict_loads(model: nn.Module) -> nn.Module:
    """Make ``model.load_state_dict(sd)`` check the entries of *every* BlockSparseLinear in ``sd``
    (``check_state_dict``: shapes of ``values`` and ``col_indices``, columns in range, none repeated)
    before it copies any tensor, so a checkpoint with one corrupt topology is rejected with the model
    unchanged. Without it each layer checks only its own entries, when its turn comes, after the
    modules before it were already overwritten. Idempotent; layers added later are covered (the check
    walks the model at load time). Returns ``model``."""
    if not getattr(model, "_sparsify_guards_loads", False):
        model.register_load_state_dict_pre_hook(_check_sparse_entries)
        model._sparsify_guards_loads = True
    return model


def sparse_layers(model: nn.Module) -> list[tuple[str, BlockSparseLinear]]:
    """Every BlockSparseLinear of the model with its qualified name (a layer registered under several
    paths appears once, under its first)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)]
