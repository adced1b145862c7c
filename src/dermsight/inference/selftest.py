"""The start-up self-test: run the network on fixed pictures and check what comes out, before serving anything.

A model file can be intact on disk and still wrong to serve: weights overwritten with NaN give a 500 on every
request, zeroed weights refuse every lesion as "not a lesion", and an export can go wrong in ways its own parity check
does not see. `probe_record` (called by `dermsight calibrate`) stores the raw logits of a few synthetic lesion-like
pictures in the model (`ModelMeta.probe`); `self_test` runs the serving runner on the same pictures and raises
`SelfTestError` unless every output is finite and, where the model records a probe, each picture gets the recorded
top class with logits within `TOLERANCE`. The web app reports itself ready (`/healthz`) only after it passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dermsight.inference.preprocess import model_inputs, synthetic_images
from dermsight.models.meta import ModelMeta

PROBE_VERSION = 1
PROBE_IMAGES = 4
# ONNX Runtime and PyTorch, fp32, on different CPUs differ by about 1e-4 in a logit; a damaged network by far more.
TOLERANCE = 0.05


class SelfTestError(RuntimeError):
    """The network gives wrong or non-finite answers on the fixed pictures."""


def probe_inputs(meta: ModelMeta) -> np.ndarray:
    return model_inputs(meta, list(synthetic_images(PROBE_IMAGES)))


def probe_record(run, meta: ModelMeta) -> dict[str, Any]:
    """The probe to store in ``meta`` for ``run`` (a runner: inputs -> (logits, features))."""
    logits, _ = run(probe_inputs(meta))
    if not np.isfinite(logits).all():
        raise SelfTestError("the network's outputs on the fixed test pictures are not finite (NaN or infinite)")
    return {"version": PROBE_VERSION, "images": PROBE_IMAGES, "logits": np.round(logits, 5).tolist()}


def self_test(run, meta: ModelMeta) -> dict[str, Any]:
    """Check ``run`` on the probe pictures; returns what was measured, raises `SelfTestError` on a failure."""
    logits, features = run(probe_inputs(meta))
    if not (np.isfinite(logits).all() and np.isfinite(features).all()):
        raise SelfTestError("the network's outputs on the fixed test pictures are not finite (NaN or infinite)")
    probe = meta.probe or {}
    if probe.get("version") != PROBE_VERSION or not probe.get("logits"):
        return {"checked": "finite outputs"}
    expected = np.asarray(probe["logits"], dtype=np.float64)
    if expected.shape != logits.shape:
        raise SelfTestError(
            f"the network gives {logits.shape} outputs on the test pictures, the model {expected.shape}"
        )
    diff = float(np.abs(logits - expected).max())
    same_top = bool((logits.argmax(1) == expected.argmax(1)).all())
    if diff > TOLERANCE or not same_top:
        raise SelfTestError(
            f"the network's answers on the fixed test pictures differ from those recorded with the model (largest "
            f"logit difference {diff:.3g}, tolerance {TOLERANCE}; same top classes: {same_top}): its weights or "
            "its export are damaged"
        )
    return {"checked": "finite outputs and recorded answers", "max_logit_difference": diff}
