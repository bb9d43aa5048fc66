"""Integrations with other libraries.

``transformers.py`` is what sparsify knows about Hugging Face models (Conv1D, naming conventions,
tied weights, mixture-of-experts); it imports only torch, so the selection walk can consult it.
Keep this file free of imports: ``sparsify.select`` imports ``sparsify.integrations.transformers``
and would otherwise pull modules that import ``sparsify.select`` back.
"""
