"""Evaluation: off-policy estimators, metrics, baselines and the report."""
