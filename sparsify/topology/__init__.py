"""Dynamic topology: TopologyOptimizer evolves which blocks of every BlockSparseLinear are active.

A Level 2 event runs one way: statistics -> decide -> (one host synchronization) -> apply -> record.

    config.py       TopologyConfig: periods, the decision rule, new-block init (validated)
    scores.py       ScoreBank: every statistic a decision reads (block EMAs, probe norms, ages, protected
                    slots) in flat buffers whose layout it alone knows; synchronizes them across ranks
    decide.py       the decision as a pure function: scores + topology + seed -> new topology (Decision)
    apply.py        the only writer of a decision: col_indices, values, gradients, optimizer state, and
                    (through the ScoreBank) the changed slots' EMAs and ages; bumps topology_version
    records.py      the decision records: named tensors brought to the host in one transfer, TopologyDecision
    random.py       counter-based random numbers, the same on every rank (no state to move or save)
    optimizer.py    TopologyOptimizer: the three levels, protected slots, consolidate(), callbacks
    consolidate.py  the end of a task: block importance, kept and released slots for the next task
    checkpoint.py   the optimizer's topology state: saved, validated whole, then loaded
    distributed.py  DDP: one bucketed all-reduce, topology checksums, divergence errors
    fsdp.py         FSDP2: row shards, distributed checkpoints
    metrics.py      decision metrics, column entropy, topology_report, snapshot / diff, plots
"""

from sparsify.topology.config import TopologyConfig
from sparsify.topology.decide import Plan, decide
from sparsify.topology.metrics import (
    LayerDiff, TopologyReport, column_entropy, decision_metrics, diff, plot_block_mask, plot_swap_rate, snapshot,
    swap_rates, topology_report,
)
from sparsify.topology.optimizer import TopologyOptimizer
from sparsify.topology.records import TopologyDecision

__all__ = [
    "LayerDiff", "Plan", "TopologyConfig", "TopologyDecision", "TopologyOptimizer", "TopologyReport",
    "column_entropy", "decide", "decision_metrics", "diff", "plot_block_mask", "plot_swap_rate", "snapshot",
    "swap_rates", "topology_report",
]
