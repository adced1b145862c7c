"""Out-of-distribution gate: is this a dermoscopy image of a skin lesion at all?

A classifier trained on seven lesion classes answers one of the seven for a photo of a cat, often confidently, so its
softmax cannot be trusted to say "this is not a lesion". Instead we model where lesion images fall in the network's
own feature space (the pooled features before the classifier) and reject images that fall far from them.

The density is a probabilistic PCA (Tipping & Bishop, 1999) of lesion features: a Gaussian whose covariance is
exact in the ``k`` leading principal directions and isotropic (one residual variance) in the rest. The score is its
squared Mahalanobis distance divided by the feature dimension,

    score(x) = ( sum_i (u_i . (x - mu))^2 / lambda_i  +  |r(x)|^2 / sigma^2 ) / D

with ``r(x)`` the part of ``x - mu`` outside the leading directions. The two terms catch two kinds of strangers:
images that are lesion-like but extreme along the directions lesions vary in, and images whose features have a
component lesions never have (everyday photos mostly land there, in the "residual" subspace: the same idea as
ViM, Wang et al., 2022). Versus a full covariance Mahalanobis distance (Lee et al., 2018) it needs k x D numbers
instead of D x D (64 x 1280 floats = 330 kB instead of 6.5 MB) and does not invert a covariance estimated from
fewer lesions than it has entries.

The threshold is a high percentile of the scores of held-out lesion images (the validation split), so the share of
real lesions wrongly rejected is chosen, not hoped for; the share of everyday photos caught is measured separately
and stored with it (see `dermsight.inference.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METHOD = "ppca-mahalanobis"


@dataclass(frozen=True)
class FeatureDensity:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D) orthonormal rows: the leading principal directions
    variances: np.ndarray  # (k,) feature variance along each of them
    residual_variance: float  # mean variance per dimension outside them

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 64, shrinkage: float = 1e-3) -> FeatureDensity:
        """Fit to (N, D) lesion features. ``k`` is capped at N - 2 so the residual variance stays estimable.

        ``shrinkage`` adds a small fraction of the mean variance to every variance: a direction along which the
        training lesions happen to vary almost not at all would otherwise make any tiny shift look enormous.
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 3:
            raise ValueError(f"need an (N, D) feature array with N >= 3, got shape {x.shape}")
        n, d = x.shape
        k = int(max(1, min(k, n - 2, d - 1)))
        mu = x.mean(0)
        xc = x - mu
        # SVD of the centred data: the right singular vectors are the covariance's eigenvectors.
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        eig = s**2 / (n - 1)
        total = float(eig.sum())
        floor = shrinkage * total / d
        residual = float(eig[k:].sum()) / (d - k) + floor
        return cls(
            mean=mu.astype(np.float32),
            components=vt[:k].astype(np.float32),
            variances=(eig[:k] + floor).astype(np.float32),
            residual_variance=residual,
        )

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) scores; larger means further from the lesion distribution."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, the OOD statistics {self.dim}")
        xc = x - self.mean.astype(np.float64)
        z = xc @ self.components.T.astype(np.float64)
        inside = (z**2 / self.variances.astype(np.float64)).sum(1)
        residual = np.maximum((xc**2).sum(1) - (z**2).sum(1), 0.0)
        return (inside + residual / self.residual_variance) / self.dim

    def to_tensors(self, prefix: str = "ood.") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}mean": torch.from_numpy(self.mean),
            f"{prefix}components": torch.from_numpy(self.components),
            f"{prefix}variances": torch.from_numpy(self.variances),
            f"{prefix}residual_variance": torch.tensor([self.residual_variance], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "ood.") -> FeatureDensity | None:
        """The density stored by `to_tensors`, or None when ``tensors`` holds none."""
        names = ("mean", "components", "variances", "residual_variance")
        if not all(f"{prefix}{n}" in tensors for n in names):
            return None
        t = {n: tensors[f"{prefix}{n}"].numpy() for n in names}
        return cls(
            mean=t["mean"].astype(np.float32),
            components=t["components"].astype(np.float32),
            variances=t["variances"].astype(np.float32),
            residual_variance=float(t["residual_variance"].reshape(-1)[0]),
        )
