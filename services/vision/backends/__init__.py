"""Inference engines behind one interface; chosen by configuration, never by a service."""

from vision.backends.base import LOGITS, BatchingConfig, InferenceBackend, Outputs

__all__ = ["LOGITS", "BatchingConfig", "InferenceBackend", "Outputs"]
