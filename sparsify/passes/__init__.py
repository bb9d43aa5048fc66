"""Graph passes over torch.fx / torch.export graphs."""

from sparsify.passes.linear_to_block_ell import sparsify_graph

__all__ = ["sparsify_graph"]
