"""FX pass: the selected linear nodes of a ``torch.fx.GraphModule`` become Block-ELL op nodes.

Two graph dialects carry linears:
- ``torch.fx.symbolic_trace``: ``call_module`` nodes whose target is an ``nn.Linear`` (or ``Conv1D``);
- ``torch.export.export(...).module()``: ``call_function aten.linear`` nodes whose weight is a
  ``get_attr`` named ``<module fqn>.weight``.
Either way the weight's owner is replaced by a :class:`BlockSparseLinear` at the same qualified name
(so state_dict keys read ``<fqn>.values`` / ``<fqn>.col_indices``), and the node becomes
``torch.ops.sparsify.block_ell_linear(x, values, col_indices, bias)`` on ``get_attr`` inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

import sparsify.ops  # noqa: F401  (registers torch.ops.sparsify.block_ell_linear, which the rewritten nodes call)
from sparsify.config import BlockSparseConfig
from sparsify.integrations.transformers import is_linear
from sparsify.rewrite import to_block_sparse
from sparsify.select import LayerSpec, keep_rewritable, make_target, replace_submodule, report_skipped, select_linears

_ATEN_LINEAR = torch.ops.aten.linear.default


@dataclass
class _Site:
    node: fx.Node
    fqn: str  # qualified name of the module that owns the weight


def _find_sites(gm: fx.GraphModule) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_linear(gm.get_submodule(node.target)):
            sites.append(_Site(node, node.target))
        elif node.op == "call_function" and node.target in (_ATEN_LINEAR, torch.nn.functional.linear):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
                sites.append(_Site(node, weight.target[: -len(".weight")]))
    return sites


def sparsify_graph(
    gm: fx.GraphModule,
    config: BlockSparseConfig | None = None,
    *,
    layers: LayerSpec = None,
    components: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> fx.GraphModule:
    """Rewrite the selected linear nodes of ``gm`` into Block-ELL op nodes; returns ``gm``.

    :func:`sparsify.sparsify` calls this for GraphModules; ``config`` defaults to ``BlockSparseConfig()``.
    A weight used by more than one linear node is rewritten once and shared; a weight something else
    reads too (an export graph's ``lm_head.weight`` feeding the embedding as well) stays dense, with a
    warning, as does a weight tied to another module's parameter.
    """
    sites = _find_sites(gm)
    if not sites:
        raise ValueError("sparsify: the graph has no linear node (call_module nn.Linear or aten.linear) to rewrite")
    by_fqn: dict[str, list[_Site]] = {}
    for site in sites:
        by_fqn.setdefault(site.fqn, []).append(site)
    # On export graphs the owner is a plain container module holding weight and bias.
    candidates = [make_target(fqn, gm.get_submodule(fqn)) for fqn in by_fqn]
    selection = keep_rewritable(
        gm, select_linears(candidates, layers, components, filter_fn), [], also=lambda t: _read_elsewhere(by_fqn[t.fqn])
    )
    targets = selection.targets
    new_layers = to_block_sparse(targets, config or BlockSparseConfig())

    for target, sparse in zip(targets, new_layers):
        replace_submodule(gm, target.fqn, sparse)
        for site in by_fqn[target.fqn]:
            with gm.graph.inserting_before(site.node):
                values = gm.graph.get_attr(f"{target.fqn}.values")
                col_indices = gm.graph.get_attr(f"{target.fqn}.col_indices")
                bias = gm.graph.get_attr(f"{target.fqn}.bias") if sparse.bias is not None else None
                # The input is read now, not when the sites were found: it may be a linear rewritten just before.
                op_node = gm.graph.call_function(
                    torch.ops.sparsify.block_ell_linear.default, (site.node.args[0], values, col_indices, bias)
                )
            op_node.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            old_inputs = [a for a in site.node.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
            site.node.replace_all_uses_with(op_node)
            gm.graph.erase_node(site.node)
            for attr in old_inputs:  # the old weight and bias, unless something else reads them
                if not attr.users:
                    gm.graph.erase_node(attr)
    gm.graph.lint()
    gm.recompile()
    report_skipped(gm, selection.skipped)
    return gm


def _read_elsewhere(sites: list[_Site]) -> str | None:
    """Why the weight of these linear nodes must stay dense: some other node reads it too."""
    linear_nodes = {site.node for site in sites}
    for site in sites:
        weight = site.node.args[1] if len(site.node.args) > 1 else site.node.kwargs.get("weight")
        if isinstance(weight, fx.Node):
            others = sorted({str(user.target) for user in weight.users if user not in linear_nodes})
            if others:
                return f"its weight {weight.target} is also read by {', '.join(others)} (tied weights); sparsify never unties weights"
    return None
