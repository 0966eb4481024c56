"""Ryzen compression plugin: smaller representations and activations, measured against quality."""
from .saved_activations import compressed_saved_activations

__all__ = ["compressed_saved_activations"]
