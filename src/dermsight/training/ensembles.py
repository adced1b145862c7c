"""`train`: what `dermsight train` runs. One model (`fit`), or several members on one split and then their ensemble,
calibrated and given its decision rule on that split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dermsight.data.manifest import read_split_manifest
from dermsight.models.bundle import ModelLoadError, read_meta
from dermsight.models.factory import WeightsError
from dermsight.posthoc.ensemble import combine
from dermsight.training.config import TrainConfig
from dermsight.training.finish import calibrate_run
from dermsight.training.fit import fit
from dermsight.training.guards import finished_earlier, refuse_finished_run
from dermsight.training.start import start_model


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """What `dermsight train` runs; returns the model file (None on DDP ranks other than 0).

    ``cfg.members`` == 1: `fit`. Otherwise one `fit` per member, all on the same split: seeds ``cfg.seed``,
    ``cfg.seed + 1``, ... in OUT/seed<N>, or the runs ``cfg.member_overrides`` describes (other backbones, say) in
    OUT/<arch>_seed<N>; then their ensemble in OUT/model.safetensors, whose temperature, not-a-lesion gate and
    decision rule are fitted on that split's train/val parts (the members' own are skipped: they would be replaced).
    With ``resume``, members that finished earlier are kept and an interrupted one continues from its checkpoint.
    """
    if cfg.members == 1:
        res = fit(cfg, progress)
        return res.model_path if res is not None else None
    run = Path(cfg.out)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        refuse_finished_run(run, cfg.resume)
        if not cfg.resume:  # a resumed ensemble's config is written once its members agree on the split
            cfg.to_yaml(run / "config.yaml")
    members = [cfg.member_config(i) for i in range(cfg.members)]
    finished = [finished_earlier(Path(m.out), m) is not None for m in members]
    if all(finished) and _ensemble_finished(run, len(members), cfg.resume):
        # Combining and calibrating again would replace the ensemble's model, and a calibration fitted into it since.
        if main:
            print(f"{run} finished earlier (its model.safetensors is kept as it is): nothing to resume")
        return run / "model.safetensors" if main else None
    # Every member's start first (backbone, weights, teacher): a bad one fails now, not after the members before it
    # trained (the better part of an hour each on a CPU).
    for i, member in enumerate(members):
        if not finished[i]:
            try:
                start_model(member, torch.device("cpu"))
            except (ValueError, WeightsError, ModelLoadError) as e:
                raise type(e)(f"member {cfg.member_name(i)}: {e}") from None
    paths = []
    first_split = Path(members[0].out) / "split.csv"
    for i, member in enumerate(members):
        done = Path(member.out) / "model.safetensors"
        if finished[i]:  # checked above; training the members before it changes nothing in its folder
            print(f"member {cfg.member_name(i)} finished earlier: {done}")
        else:
            fit(member, progress, same_split_as=first_split if i else None)
        paths.append(done)
    if not main:
        return None
    if cfg.resume:
        cfg.to_yaml(run / "config.yaml")
    model_path = Path(combine(paths, run / "model.safetensors")["model"])
    print(f"ensemble of {len(paths)} written to {model_path}")
    metrics = read_meta(model_path).metrics
    if cfg.calibrate:
        split_at = paths[0].parent
        metrics = calibrate_run(cfg, model_path, read_split_manifest(split_at), split_at, progress)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model_path


def _ensemble_finished(run: Path, members: int, resume: bool) -> bool:
    """Whether a resumed ensemble's model and metrics are there, for the member list it has now."""
    ensemble = run / "model.safetensors"
    return (
        resume
        and ensemble.is_file()
        and (run / "metrics.json").is_file()
        and read_meta(ensemble).members == members  # not when the member list changed since
    )
