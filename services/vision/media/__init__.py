"""Bytes to pixels: decoding under limits, preprocessing presets, views (crops), bundled photos."""
