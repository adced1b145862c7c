"""The inference engine: `predictor.Predictor` (decode, image-quality gate, model, not-a-lesion gate, calibrated
probabilities, Grad-CAM), ONNX export and parity (`export`), calibration (`calibration`), and the result types
(`types`) shared by the CLI, the web pages and the JSON API.

Import `dermsight.inference.predictor` for the engine itself; this package module stays light so that code which only
needs the result types does not load PyTorch or ONNX Runtime.
"""

from dermsight.inference.types import ClassProbability, PredictionResult

__all__ = ["ClassProbability", "PredictionResult"]
