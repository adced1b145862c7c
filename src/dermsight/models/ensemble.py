"""Several trained networks served as one model: their logits are averaged.

Independently trained runs make partly independent mistakes, so the mean of their logits ranks classes better than
any one of them (Lakshminarayanan et al., 2017; every leading ISIC entry is an ensemble). On the default recipe's val
split, three seeds went from macro AUC 0.946 / 0.946 / 0.949 alone to 0.954 together, and the validation NLL from
0.62-0.66 to 0.60 (docs/experiments.md). Runs of one recipe on different backbones differ more than seeds of
one backbone, which is what an ensemble feeds on; such a *mixed* ensemble needs members whose last feature maps share
their spatial size at the shared input size (every stride-32 timm backbone does).

`Ensemble` looks like one timm model to everything downstream, so serving, ONNX export, Grad-CAM and the
out-of-distribution gate need no special case:

- ``forward_features`` concatenates the members' last feature maps along the channels (same input, so the same
  spatial size). Grad-CAM on that map weighs every member's channels by their gradient for the averaged logit: the
  explanation is that of the ensemble's decision.
- ``forward_head`` splits the map back into the members' channel blocks (``num_features`` each); logits are
  averaged, pre-logit features concatenated.
- ``feature_info`` lists every member's stages (prefixed), which `backends.ServingModule` hooks for the gate.
- One input serves all: a member trained with another normalisation (MobileNetV2's ImageNet mean/std beside
  EfficientNet-Lite's 0.5/0.5) gets the fixed per-channel affine map that turns the ensemble's normalised input into
  its own (``input_maps``), so preprocessing stays one contract in the model file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Norm = tuple[Sequence[float], Sequence[float]]  # (mean, std) per RGB channel


def input_map(ensemble: Norm, member: Norm) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), each (1, 3, 1, 1), with ``x * scale + shift`` = a member's normalised input, given the
    ensemble's: ``(x * s_e + m_e - m_m) / s_m``. None when the two normalisations agree."""
    (me, se), (mm, sm) = ensemble, member
    if list(map(float, me)) == list(map(float, mm)) and list(map(float, se)) == list(map(float, sm)):
        return None
    me, se, mm, sm = (torch.tensor([float(v) for v in t]).view(1, 3, 1, 1) for t in (me, se, mm, sm))
    return se / sm, (me - mm) / sm


class Ensemble(nn.Module):
    """The mean of the members' logits (see the module docstring). ``input_maps`` (one per member, None for the
    identity) adapts the shared input to members trained with another normalisation (`input_map`)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        input_maps: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        input_maps = list(input_maps) if input_maps is not None else [None] * len(members)
        if len(input_maps) != len(members):
            raise ValueError("give one input map (or None) per member")
        self.members = nn.ModuleList(members)
        self.widths = [int(m.num_features) for m in members]  # each member's block of the feature map
        # Derived from the model file's metadata, so not saved with the weights (persistent=False).
        for i, im in enumerate(input_maps):
            if im is not None:
                self.register_buffer(f"in_scale{i}", im[0].float().clone(), persistent=False)
                self.register_buffer(f"in_shift{i}", im[1].float().clone(), persistent=False)
        self.feature_info = [
            {**f, "module": f"members.{i}.{f['module']}"}
            for i, m in enumerate(members)
            for f in getattr(m, "feature_info", [])
        ]

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        scale = getattr(self, f"in_scale{i}", None)
        return x if scale is None else x * scale + getattr(self, f"in_shift{i}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(self.member_input(i, x)) for i, m in enumerate(self.members)], 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=1)
        outs = [m.forward_head(p, pre_logits=pre_logits) for m, p in zip(self.members, parts, strict=True)]
        return torch.cat([o.flatten(1) for o in outs], 1) if pre_logits else torch.stack(outs).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        # What `save_model` checks the class count against; every member has the same head.
        return self.members[0].get_classifier()
