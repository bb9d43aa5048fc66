"""sparsify: real block-sparse (Block-ELL) linear layers whose topology can evolve during training.

    from sparsify import sparsify, densify, BlockSparseLinear
    model = sparsify(model, layers="8..12", components=("mlp",), density=0.5, block_size=16)
"""

from sparsify.api import densify, skipped_layers, sparse_layers, sparsify, sparsity_table
from sparsify.compile import compile_repeated_layers
from sparsify.config import BlockSparseConfig
from sparsify.kernels.options import KernelOptions, kernel_options, set_kernel_options
from sparsify.layer import BlockSparseLinear, guard_state_dict_loads
from sparsify.topology import TopologyConfig, TopologyOptimizer, topology_report

__all__ = [
    "BlockSparseConfig", "BlockSparseLinear", "KernelOptions", "TopologyConfig", "TopologyOptimizer",
    "compile_repeated_layers", "densify",
    "guard_state_dict_loads", "kernel_options", "set_kernel_options", "skipped_layers", "sparse_layers", "sparsify",
    "sparsity_table", "topology_report",
]
__version__ = "0.1.0"
