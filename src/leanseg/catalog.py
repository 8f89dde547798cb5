"""What config validation needs to know of the built-in models and datasets, without torch.

``leanseg config show`` and ``--help`` must not import torch (a second or more), so the option
names of each registered model and the class count of each dataset are kept here as plain data.
tests/test_catalog.py fails when they drift from the registry and ``leanseg.data.build``. A
model registered by the user (``leanseg.register_model``) is looked up in the live registry.
"""

from __future__ import annotations

import sys

_DEEPLAB = ("aspp_dropout", "aspp_rates", "channels", "crf", "crf_gamma", "crf_iters", "norm")
_DEEPLAB += ("output_stride", "width_mult")
_RESNET = ("aux", "multi_grid")

MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "deeplabv3_mobilenetv2": (*_DEEPLAB, "head_conv"),
    "deeplabv3_resnet18": (*_DEEPLAB, *_RESNET, "head_conv"),
    "deeplabv3_resnet50": (*_DEEPLAB, *_RESNET, "head_conv"),
    "deeplabv3_resnet101": (*_DEEPLAB, *_RESNET, "head_conv"),
    "deeplabv3plus_mobilenetv2": _DEEPLAB,
    "deeplabv3plus_resnet18": (*_DEEPLAB, *_RESNET),
    "deeplabv3plus_resnet50": (*_DEEPLAB, *_RESNET),
    "deeplabv3plus_resnet101": (*_DEEPLAB, *_RESNET),
    "fasterseg": ("arch", "aux", "width_mult"),
    "fasterseg_student": ("aux", "width_mult"),
    "fasterseg_teacher": ("aux", "width_mult"),
    "pspnet50": ("aux", "dropout", "norm", "width_mult"),
    "pspnet101": ("aux", "dropout", "norm", "width_mult"),
    "resnet18_cifar": ("norm", "width_mult"),
    "segnet": ("legacy_head", "norm", "width_mult"),
}

# data.dataset -> its default class count (None: a folder's comes from data.num_classes or its
# palette file)
DATASET_CLASSES: dict[str, int | None] = {
    "synthetic": 7,
    "voc": 21,
    "voc_aug": 21,
    "cityscapes": 19,
    "ade20k": 150,
    "camvid": 11,
    "folder": None,
    "cifar10": 10,
}
CAMVID_VOID = 11  # the label of CamVid's void pixels (SegNet's version)


def _live_registry() -> bool:
    """Whether torch and the model registry are loaded already (e.g. in a Python session)."""
    return "leanseg.models" in sys.modules


def model_names() -> list[str]:
    """The registered model names (the built-in ones when the registry is not loaded)."""
    if _live_registry():
        from leanseg.models import list_models

        return list_models()
    return sorted(MODEL_OPTIONS)


def model_option_names(name: str) -> tuple[str, ...] | None:
    """The options model ``name`` accepts; None for an unknown model."""
    if not _live_registry() and name in MODEL_OPTIONS:
        return MODEL_OPTIONS[name]
    from leanseg.models import list_models, model_options  # a user's model: the live registry

    return tuple(model_options(name)) if name in list_models() else None
