"""Foundations every layer may use: errors, atomic file writes, CPU budget, Prometheus metrics; imports no other vision module."""
