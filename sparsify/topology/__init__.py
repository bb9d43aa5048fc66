"""Dynamic topology: TopologyOptimizer evolves which blocks of every BlockSparseLinear are active.

    scores.py       per-block statistics (gradient EMA, activation / error norms, ages, protected slots)
    decide.py       the decision as a pure function: scores + topology + generator -> new topology
    config.py       TopologyConfig: periods, the decision rule, new-block init (validated)
    optimizer.py    TopologyOptimizer: the CMS levels, applying decisions in place
    distributed.py  DDP: one bucketed all-reduce of the statistics, seeded generators, topology checksum
    metrics.py      decision records, column entropy, topology_report, snapshot / diff, plots
"""

from sparsify.topology.decide import Plan, decide
from sparsify.topology.metrics import (
    LayerDiff, TopologyDecision, TopologyReport, column_entropy, decision_metrics, diff, plot_block_mask, plot_swap_rate,
    snapshot, swap_rates, topology_report,
)
from sparsify.topology.config import TopologyConfig
from sparsify.topology.optimizer import TopologyOptimizer

__all__ = [
    "LayerDiff", "Plan", "TopologyConfig", "TopologyDecision", "TopologyOptimizer", "TopologyReport",
    "column_entropy", "decide", "decision_metrics", "diff", "plot_block_mask", "plot_swap_rate", "snapshot",
    "swap_rates", "topology_report",
]
