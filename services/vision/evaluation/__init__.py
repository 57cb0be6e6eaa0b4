"""Offline scores with known definitions: multi-label tagging metrics, retrieval metrics, int8 agreement."""
