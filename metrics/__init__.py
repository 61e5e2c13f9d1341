"""Segmentation metrics: a streaming confusion matrix (BARM's StreamSegMetrics formulas) and step summaries."""
from metrics.stream_metrics import StreamSegMetrics
from metrics.summary import step_summary

__all__ = ["StreamSegMetrics", "step_summary"]
