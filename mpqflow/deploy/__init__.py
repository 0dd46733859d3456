"""The way out of the pipeline: what a runtime needs and what it measures.

Modules: latency (per-layer latency tables, the input of the latency budgets).
"""
