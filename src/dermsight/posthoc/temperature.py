"""Temperature scaling (Guo et al., 2017): one number T that divides the logits, fitted to minimise the negative
log-likelihood of the validation labels. It changes no prediction, only how confident the probabilities are."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(targets)].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of ``targets`` under ``softmax(logits / T)``.

    Optimised over log T: the NLL is smooth and unimodal in it, and one bounded scalar search (Brent) finds the
    minimum to 1e-6 without gradients or a learning rate.
    """
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
    if logits.ndim != 2 or len(logits) != len(targets) or not len(logits):
        raise ValueError(f"need (N, C) logits and N targets, got {logits.shape} and {targets.shape}")
    res = minimize_scalar(
        lambda log_t: nll(logits, targets, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))
