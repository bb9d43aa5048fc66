"""Regional compilation of a model's repeated layers: the path that makes an eager layer call's host time
irrelevant (torch.compile once per distinct layer; with ``mode="reduce-overhead"``, CUDA graphs that
replay each layer's forward and backward as one launch).

Why regional: the decoder layers of a transformer are identical modules, so one compiled graph serves
them all (a whole-model compile traces every layer), and a graph break elsewhere (the loss, a
tokenizer-dependent branch) cannot split a layer. Why it stays correct when the topology changes:
``values`` and ``col_indices`` are parameters and buffers, so CUDA-graph trees treat them as static
inputs (the address is checked on each replay, the contents read in place), the TopologyOptimizer
writes them only in place, and the kernels' topology metadata is rebuilt inside the graph on every
replay (``kernels/topology_cache.py``). A training loop under ``reduce-overhead`` marks each step with
``torch.compiler.cudagraph_mark_step_begin()`` (the previous step's graph outputs are then dead).
"""

from __future__ import annotations

from torch import nn

from sparsify.layer import BlockSparseLinear


def compile_repeated_layers(model: nn.Module, mode: str | None = "reduce-overhead", **options) -> list[str]:
    """``module.compile(mode=mode, **options)`` for every child of every ``nn.ModuleList`` that holds a
    BlockSparseLinear (the decoder layers of a transformer), outermost lists first and nothing inside an
    already compiled child; returns the compiled children's names. Raises ValueError if there is none."""
    compiled: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(done + ".") for done in compiled):
            continue
        for index, child in enumerate(module):
            if any(isinstance(m, BlockSparseLinear) for m in child.modules()):
                child.compile(mode=mode, **options)
                compiled.append(f"{name}.{index}" if name else str(index))
    if not compiled:
        raise ValueError(
            f"compile_repeated_layers: {type(model).__name__} has no nn.ModuleList whose layers hold a "
            "BlockSparseLinear; run sparsify(model, ...) first, or compile the model with torch.compile(model)"
        )
    return compiled
