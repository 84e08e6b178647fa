"""Prefect tasks: thin wrappers adding caching, retries, MLflow logging and artifacts to one library call each."""
