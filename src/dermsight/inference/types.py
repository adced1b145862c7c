"""Names the web app's settings check needs without loading the inference stack."""

from __future__ import annotations

# The inference backends a Predictor can run (`predictor.BackendName`).
BACKENDS = ("auto", "onnx", "torch")
