"""Backbones (one timm factory) and the saved-model format that carries its own contract."""

from dermsight.models.bundle import ModelLoadError, load_model, read_meta, save_model
from dermsight.models.factory import (
    ARCHS,
    OFFLINE_WEIGHTS,
    WeightsError,
    WeightsInfo,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_model,
    freeze_backbone,
    offline_weights_available,
    unfreeze,
)
from dermsight.models.meta import ModelMeta

__all__ = [
    "ARCHS",
    "OFFLINE_WEIGHTS",
    "ModelLoadError",
    "ModelMeta",
    "WeightsError",
    "WeightsInfo",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "create_model",
    "freeze_backbone",
    "load_model",
    "offline_weights_available",
    "read_meta",
    "save_model",
    "unfreeze",
]
