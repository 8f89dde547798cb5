"""The torch-free catalogue that config validation reads equals the live registries."""

from __future__ import annotations

from leanseg import catalog
from leanseg.data.build import DATASETS
from leanseg.data.camvid import CamVidSegmentation
from leanseg.models import list_models, model_options


def test_model_options_match_the_registry():
    live = {name: sorted(model_options(name)) for name in list_models()}
    built_in = {name: sorted(options) for name, options in catalog.MODEL_OPTIONS.items()}
    user_models = set(live) - set(built_in)  # registered by other tests, e.g. test_own_model
    assert {name: live[name] for name in live if name not in user_models} == built_in


def test_dataset_class_counts_match_the_builders():
    assert catalog.DATASET_CLASSES == {name: spec.num_classes for name, spec in DATASETS.items()}
    assert CamVidSegmentation.IGNORE_INDEX == catalog.CAMVID_VOID


def test_a_model_the_user_registers_is_validated_from_the_live_registry():
    from leanseg.config import load_config
    from leanseg.models import register_model
    from leanseg.models.registry import _BUILDERS

    def catalog_test_model(num_classes: int, width: int = 4):
        from torch import nn

        return nn.Conv2d(3, num_classes, 1)

    catalog_test_model.default_options = {"width": 4}
    register_model(catalog_test_model)
    try:
        cfg = load_config(None, ["model.name=catalog_test_model", "model.options={width: 8}"])
        assert cfg.model.options == {"width": 8}
    finally:
        del _BUILDERS["catalog_test_model"]
