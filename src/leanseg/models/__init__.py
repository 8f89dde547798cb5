"""Segmentation models, built by name."""

from leanseg.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
