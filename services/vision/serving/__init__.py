"""The live model set: loading served models, the data plane every servicer calls, registry status."""
