"""Inference engines behind one interface and the one batch plan they share; chosen by configuration, never by a service."""

from vision.backends.base import LOGITS, BatchingConfig, InferenceBackend, Outputs

__all__ = ["LOGITS", "BatchingConfig", "InferenceBackend", "Outputs"]
