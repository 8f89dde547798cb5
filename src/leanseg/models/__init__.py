"""Segmentation models, built by name."""

from leanseg.models import deeplab  # noqa: F401  (registers the DeepLab builders)
from leanseg.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
