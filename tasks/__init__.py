"""Prefect tasks, one per step of the method, grouped by step: data, supernet, search, evaluate, export."""
