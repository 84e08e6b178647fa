"""Prefect flows: compress (multi-stage), ablation (strategies side by side), teacher (the offline demo teacher), and the `slimmoe run` / `demo` / `ablate` commands."""
