"""The verbs: ``sparsify`` rewrites chosen linears into Block-ELL layers, ``densify`` undoes it,
``sparsity_table`` shows what was done (and what was left dense, and why)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tabulate import tabulate
from torch import fx, nn

from sparsify.config import BlockSparseConfig
from sparsify.integrations import hf_checkpoint
from sparsify.layer import BlockSparseLinear, guard_state_dict_loads, sparse_layers
from sparsify.passes.linear_to_block_ell import sparsify_graph
from sparsify.rewrite import to_block_sparse
from sparsify.select import LayerSpec, forget_skipped, replace_submodule, report_skipped, select, skipped_layers


def sparsify(
    model: nn.Module,
    config: BlockSparseConfig | None = None,
    *,
    layers: LayerSpec = None,
    components: str | Sequence[str] | None = None,
    density: float | None = None,
    block_size: int | None = None,
    init: str | None = None,
    seed: int | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Rewrite the selected linears of ``model`` into :class:`BlockSparseLinear` layers.

    Args:
        config: a :class:`BlockSparseConfig`; the keywords ``density``, ``block_size``, ``init`` and
            ``seed`` override its fields (defaults: density 0.5, block_size 16, init "magnitude").
        layers: ``"8..12"`` (inclusive), ``"1,3,5..7"``, a ``range``, an int, a list of ints, or None
            for all. An index alone selects that layer in *every* stack, so ``layers=1`` on T5 or BART
            takes layer 1 of the encoder and of the decoder; name the stack to choose one:
            ``"decoder.2..4"``, ``"encoder.0..1"``, ``"encoder.0,decoder.3"``.
        components: ``"mlp"``, ``"attn"``, linear names (``"up_proj"``) or globs (``"*.fc1"``); None for all.
        density: fraction of blocks kept per block-row, in (0, 1]; ``K = max(1, round(C * density))``
            per layer, so the density used can differ (a warning names the layers more than 0.05 off).
        block_size: B; both dimensions of every selected linear must be multiples of it.
        init: ``"magnitude"`` keeps the K largest blocks of the weight, ``"random"`` draws K columns.
        seed: seeds ``init="random"``.
        filter_fn: ``(module, fqn) -> bool``, narrows the selection further.

    An ``nn.Module`` is rewritten in place and returned; a ``torch.fx.GraphModule`` (from
    ``symbolic_trace`` or ``torch.export(...).module()``) goes through the graph pass and the rewritten
    GraphModule is returned. Layers already sparse are left alone. A module registered under several
    paths is rewritten at every path to the same sparse layer. Selected linears that must stay dense
    are skipped with a warning and listed by :func:`skipped_layers` and :func:`sparsity_table`: a
    weight tied to another module's parameter (``lm_head`` with ``tie_word_embeddings=True``; sparsify
    never unties), ``nn.MultiheadAttention.out_proj``, mixture-of-experts weights. On any error nothing
    is changed.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
        >>> model = sparsify(model, layers="1..2", components="mlp", density=0.5, block_size=16)
        >>> type(model.model.layers[1].mlp.up_proj).__name__
        'BlockSparseLinear'
    """
    config = BlockSparseConfig.resolve(config, density=density, block_size=block_size, init=init, seed=seed)
    if isinstance(model, fx.GraphModule):
        return sparsify_graph(model, config, layers=layers, components=components, filter_fn=filter_fn)
    selection = select(model, layers, components, filter_fn, already_sparse=lambda m: isinstance(m, BlockSparseLinear))
    hf_checkpoint.check_not_quantized(model)
    for target, sparse in zip(selection.targets, to_block_sparse(selection.targets, config)):
        for path in target.all_paths:
            replace_submodule(model, path, sparse)
    report_skipped(model, selection.skipped)
    guard_state_dict_loads(model)
    hf_checkpoint.record_sparsity(model)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every BlockSparseLinear back into the dense module it was cut from (``nn.Linear``, or GPT-2's
    ``Conv1D``) with the zero-filled dense weight; a layer registered under several paths becomes one
    module at all of them."""
    every_path = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, BlockSparseLinear)]
    dense_of: dict[int, nn.Linear] = {}
    for name, layer in every_path:
        if id(layer) not in dense_of:
            dense_of[id(layer)] = layer.to_dense_module()
        replace_submodule(model, name, dense_of[id(layer)])
    forget_skipped(model)
    hf_checkpoint.record_sparsity(model)
    return model


def sparsity_table(model: nn.Module, tablefmt: str = "github") -> str:
    """A table of every rewritten layer: shape, block size, K / C, the density asked for and the one
    used (K / C after rounding), bytes kept and saved; then the layers left dense, with the reason."""
    rows, saved_total = [], 0
    for name, layer in sparse_layers(model):
        element = layer.values.element_size()
        dense_bytes = layer.in_features * layer.out_features * element
        sparse_bytes = layer.values.numel() * element + layer.col_indices.numel() * layer.col_indices.element_size()
        saved_total += dense_bytes - sparse_bytes
        rows.append([
            name, f"{layer.in_features}->{layer.out_features}", layer.block_size,
            f"{layer.blocks_per_row}/{layer.num_cols}", f"{layer.config.density:.3f}", f"{layer.density:.3f}",
            _human_bytes(sparse_bytes), _human_bytes(dense_bytes - sparse_bytes),
        ])
    skipped = skipped_layers(model)
    lines = [f"left dense: {s.fqn}: {s.reason}" for s in skipped]
    if not rows:
        return "\n".join(["no BlockSparseLinear layers", *lines])
    headers = ["layer", "in->out", "B", "K/C", "density asked", "density used", "weight bytes", "saved"]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    return "\n".join([table, f"{len(rows)} layers, {_human_bytes(saved_total)} of weights saved", *lines])


def _human_bytes(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} GiB"
