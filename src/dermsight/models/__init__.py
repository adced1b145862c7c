"""Backbones (one timm factory) and the saved-model format that carries its own contract.

The names below are imported on first use (PEP 562): `models.contract`, `models.meta` and `models.records` need no
PyTorch, and a serving install without it imports them through this package."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ModelLoadError": "dermsight.models.contract",
    "read_meta": "dermsight.models.contract",
    "load_model": "dermsight.models.bundle",
    "save_model": "dermsight.models.bundle",
    "ModelMeta": "dermsight.models.meta",
    "ARCHS": "dermsight.models.records",
    "WeightsInfo": "dermsight.models.records",
    "OFFLINE_WEIGHTS": "dermsight.models.factory",
    "WeightsError": "dermsight.models.factory",
    "WeightsMismatchError": "dermsight.models.factory",
    "WeightsUnavailableError": "dermsight.models.factory",
    "create_model": "dermsight.models.factory",
    "freeze_backbone": "dermsight.models.factory",
    "offline_weights_available": "dermsight.models.factory",
    "unfreeze": "dermsight.models.factory",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'dermsight.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
