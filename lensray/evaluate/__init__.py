"""Evaluation: metrics, inference with TTA, reports, run comparison and catalogue scoring."""
