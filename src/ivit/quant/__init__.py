"""Quantization workflow steps: convert (``quantize``), calibrate / search (PTQ), freeze."""

from .api import calibrate, freeze_ranges, quantize
from .freeze import freeze

__all__ = ["calibrate", "freeze_ranges", "quantize", "freeze"]
