"""Helpers of examples/forgetting.py: data, model, arms, training, report."""
