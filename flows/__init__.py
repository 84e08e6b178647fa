"""Prefect flows: compress (multi-stage), teacher (offline demo teacher)."""
