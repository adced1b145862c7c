"""Preprocessing and scoring: image to model input (`preprocess`, `transforms`), the one scoring path (`scoring`), the
network's backends (`backends`, `export`), the image-quality and not-a-lesion gates (`quality`, `ood`), explanations
(`explain`) and the serving engine built on them (`predictor.Predictor`).

This package module stays light: `types` needs neither PyTorch nor ONNX Runtime.
"""
