"""Offline commands that run no server: int8 quantization and other model tools."""
