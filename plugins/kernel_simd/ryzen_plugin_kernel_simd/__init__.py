"""Ryzen kernel plugin: detect what this CPU can do and use the execution paths that exploit it."""
from .cpu import CpuFeatures, detect

__all__ = ["CpuFeatures", "detect"]
