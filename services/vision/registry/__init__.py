"""The model registry: MLflow's Model Registry plus what serving needs from it (package, golden outputs and gate, the publisher that follows aliases); see docs/registry.md."""
