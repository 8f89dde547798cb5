"""Segmentation (and CIFAR classification) models, built by name."""

from leanseg.models import (  # noqa: F401  (registration)
    cifar_resnet,
    deeplab,
    fasterseg,
    pspnet,
    segnet,
)
from leanseg.models.pretrained import LoadReport, load_pretrained
from leanseg.models.registry import (
    build_model,
    list_models,
    model_options,
    register_builder,
    register_model,
)

__all__ = [
    "LoadReport",
    "build_model",
    "list_models",
    "load_pretrained",
    "model_options",
    "register_builder",
    "register_model",
]
