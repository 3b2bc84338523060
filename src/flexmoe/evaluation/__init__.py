"""Evaluation: generation, ROUGE, and (later) knowledge retention, routing and cost metrics."""
