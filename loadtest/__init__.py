"""Load generation and raw-model baselines for the vision services (`python -m loadtest`)."""
