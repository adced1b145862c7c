"""Out-of-distribution gate: is this a dermoscopy image of a skin lesion at all?

A classifier trained on seven lesion classes answers one of the seven for a photo of a cat, often confidently, so its
softmax cannot be trusted to say "this is not a lesion". Instead we model where lesion images fall in the network's
own feature space and reject images that fall far from them.

The features (`backends.ServingModule`) are the pooled features the classifier reads plus, for each stage of the
backbone, the mean and standard deviation of every channel. Each block gets its own density, a probabilistic PCA
(Tipping & Bishop, 1999): a Gaussian whose covariance is exact in the ``k`` leading principal directions and isotropic
in the rest. A block's score is its squared Mahalanobis distance divided by the block's width,

    score_b(x) = ( sum_i (u_i . (x - mu))^2 / lambda_i  +  |r(x)|^2 / sigma^2 ) / D_b

with ``r(x)`` the part of ``x - mu`` outside the leading directions (everyday photos mostly land there: the idea of
ViM, Wang et al., 2022). The gate's score is the sum over blocks of ``score_b`` divided by its median on validation
lesions, so every block has the same say; channel statistics of several depths are the multi-layer Mahalanobis
detector of Lee et al. (2018) and the feature statistics of Sastry & Oore (2020). Measured on HAM10000 with early
checkpoints of the default model, against 64 non-lesion images (photos of people, animals, streets, objects, text,
screenshots and crops of them): the classifier's pooled features alone caught about half of them at a 2% false
rejection rate on validation lesions; with the per-stage statistics, 98-100%, with 1-2.5% of held-out lesions
rejected (the numbers of the shipped model are in its card).

A PPCA needs k x D numbers per block instead of a D x D covariance (for EfficientNet-Lite0, 2304 features in six
blocks: about 1 MB in all) and does not invert a covariance estimated from fewer lesions than it has entries.

The threshold is a high percentile of the scores of held-out lesion images (the validation split), so the share of
real lesions wrongly rejected is chosen, not hoped for; the share of non-lesion photos caught is measured separately
(see `dermsight.posthoc.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

METHOD = "multi-layer-ppca-mahalanobis"


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

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch  # only where a model file is written, by the training side

        return {
            "mean": torch.from_numpy(self.mean),
            "components": torch.from_numpy(self.components),
            "variances": torch.from_numpy(self.variances),
            "residual_variance": torch.tensor([self.residual_variance], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Any]) -> FeatureDensity:
        """From `tensors` as a model file gives them back: PyTorch tensors or numpy arrays."""
        return cls(
            mean=np.asarray(t["mean"], dtype=np.float32),
            components=np.asarray(t["components"], dtype=np.float32),
            variances=np.asarray(t["variances"], dtype=np.float32),
            residual_variance=float(np.asarray(t["residual_variance"]).reshape(-1)[0]),
        )


@dataclass(frozen=True)
class Block:
    name: str  # "pooled" or the stage module's name
    start: int  # columns [start, end) of the features
    end: int
    scale: float = 1.0  # median score of validation lesions; scores are divided by it


@dataclass(frozen=True)
class OODGate:
    """One `FeatureDensity` per block of features; `score` sums the scaled block scores."""

    blocks: tuple[Block, ...]
    densities: tuple[FeatureDensity, ...]
    threshold: float = float("inf")  # images scoring above are rejected

    @classmethod
    def fit(cls, features: np.ndarray, layout: list[tuple[str, int, int]], k: int = 64) -> OODGate:
        """Fit every block's density to (N, D) lesion features; scales and threshold are set by `calibrated`."""
        x = np.asarray(features, np.float64)
        if x.shape[1] != layout[-1][2]:
            raise ValueError(f"features have {x.shape[1]} columns, the layout {layout[-1][2]}")
        blocks = tuple(Block(n, s, e) for n, s, e in layout if e > s)
        dens = tuple(FeatureDensity.fit(x[:, b.start : b.end], k=min(k, (b.end - b.start) // 2)) for b in blocks)
        return cls(blocks, dens)

    def block_scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, blocks) unscaled scores."""
        x = np.asarray(features, np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.blocks[-1].end:
            raise ValueError(f"features have {x.shape[1]} columns, the OOD statistics expect {self.blocks[-1].end}")
        return np.stack([d.score(x[:, b.start : b.end]) for b, d in zip(self.blocks, self.densities, strict=True)], 1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) scores; larger means further from the lesion images the gate was fitted on."""
        scales = np.array([b.scale for b in self.blocks])
        return (self.block_scores(features) / scales).sum(1)

    def calibrated(
        self, val_features: np.ndarray, target_rejection: float, groups: np.ndarray | None = None
    ) -> OODGate:
        """Scales from the validation lesions' median block scores, and the threshold that rejects
        ``target_rejection`` of them; with ``groups`` (one label per row: the image's source, say), at most that share
        of each group, so a minority source cannot hide behind the pooled rate."""
        raw = self.block_scores(val_features)
        scales = np.maximum(np.median(raw, 0), 1e-12)
        blocks = tuple(Block(b.name, b.start, b.end, float(s)) for b, s in zip(self.blocks, scales, strict=True))
        total = (raw / scales).sum(1)
        keys = np.zeros(len(total)) if groups is None else np.asarray(groups)
        threshold = max(float(np.quantile(total[keys == g], 1 - target_rejection)) for g in np.unique(keys))
        return OODGate(blocks, self.densities, threshold)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for `save_model(..., extra=...)`."""
        return {f"ood.{i}.{k}": v for i, d in enumerate(self.densities) for k, v in d.tensors().items()}

    def describe(self) -> dict[str, Any]:
        """The JSON part, stored in ``ModelMeta.ood`` next to the tensors."""
        return {
            "method": METHOD,
            "threshold": self.threshold,
            "blocks": [
                {"name": b.name, "start": b.start, "end": b.end, "scale": b.scale, "components": len(d.variances)}
                for b, d in zip(self.blocks, self.densities, strict=True)
            ],
        }

    @classmethod
    def load(cls, ood: dict[str, Any], tensors: dict[str, Any]) -> OODGate | None:
        """The gate stored by `describe` + `to_tensors`; None when the model has none (or another method's)."""
        if ood.get("method") != METHOD or "threshold" not in ood:
            return None
        blocks, dens = [], []
        for i, b in enumerate(ood["blocks"]):
            parts = {k[len(f"ood.{i}.") :]: v for k, v in tensors.items() if k.startswith(f"ood.{i}.")}
            if len(parts) != 4:
                return None
            blocks.append(Block(str(b["name"]), int(b["start"]), int(b["end"]), float(b["scale"])))
            dens.append(FeatureDensity.from_tensors(parts))
        return cls(tuple(blocks), tuple(dens), float(ood["threshold"]))
