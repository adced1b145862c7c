"""Model soups: average the weights of several fine-tuned runs into one model (Wortsman et al., ICML 2022).

Runs fine-tuned from the same pretrained weights (here: the same config with different seeds) often land in one
basin of the loss, where the average of their weights scores like an ensemble of them but costs one model at
inference: the CPU latency, the bundle size, the ONNX export and Grad-CAM are those of a single network.

The greedy recipe keeps this honest: ingredients are ranked by their own validation score and each is added only
when the soup's validation score does not drop, so the result is never worse on val than the best run alone (and the
test split plays no part). The score is the one the decision rule maximises (`dermsight.posthoc.decision`):
balanced accuracy + accuracy under the best prior correction tau, since that rule is what the soup will be served
with; raw argmax balanced accuracy alone would favour runs whose class weighting happens to suit argmax.

Averaged BatchNorm statistics do not describe the averaged network, so they are re-estimated on training images
(eval preprocessing, as served) before each soup is scored.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from dermsight.data.manifest import read_labels, read_split_manifest
from dermsight.data.problems import DataError
from dermsight.inference.scoring import input_batches, score_images
from dermsight.models.bundle import load_model, read_runs, save_model
from dermsight.models.factory import use_cuda
from dermsight.models.meta import ModelMeta
from dermsight.posthoc.decision import choose, train_prior


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (computed in float32); integer buffers such as BatchNorm's
    ``num_batches_tracked`` are taken from the first state."""
    if not states:
        raise ValueError("nothing to average")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("the models have different parameters and cannot be averaged")
    out = {}
    for k in keys:
        t = states[0][k]
        if t.is_floating_point():
            out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(t.dtype)
        else:
            out[k] = t.clone()
    return out


@torch.no_grad()
def reset_batchnorm(model: nn.Module, meta: ModelMeta, paths: list[str], batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``paths`` (serving preprocessing;
    unreadable images are left out of the statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {}
    for m in bns:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for _, prepared in input_batches(meta, paths, batch_size=batch_size, progress=False):
        xs = [p.x for p in prepared if p.x is not None]
        if xs:
            model(torch.from_numpy(np.concatenate(xs)).to(device).contiguous(memory_format=torch.channels_last))
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)


def _score(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray) -> dict[str, float]:
    ok = ~np.isnan(logits).any(axis=1)
    tau, ba, acc = choose(logits[ok], y[ok], log_prior)
    return {"score": ba + acc, "balanced_accuracy": ba, "accuracy": acc, "tau": tau}


def make_soup(
    model_paths: list[str | os.PathLike],
    manifest: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    greedy: bool = True,
    bn_images: int = 2000,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Average ``model_paths`` (greedily on the val score, unless ``greedy`` is false) into ``out``; scoring runs on
    ``device`` (auto | cpu | cuda, as training's)."""
    paths, names, metas = read_runs(list(model_paths), "a soup")
    df = manifest if isinstance(manifest, pd.DataFrame) else read_split_manifest(manifest)
    val, train = df[df["split"] == "val"], df[df["split"] == "train"]
    if val.empty or train.empty:
        raise DataError("the manifest needs `train` (BatchNorm statistics) and `val` (selection) splits")
    y = read_labels(val, metas[0])
    _, log_prior = train_prior(train, metas[0])
    val_paths = [str(p) for p in val["path"]]
    bn_paths = [str(p) for p in train["path"].sample(min(bn_images, len(train)), random_state=seed)]
    dev = torch.device("cuda" if use_cuda(device) else "cpu")

    loaded = [load_model(p, device=dev) for p in paths]
    # Copies: `work` below is the first model itself, and loading a soup into it must not change the ingredients.
    states = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m, _ in loaded]
    # Every candidate is scored through one preprocessing, the first model's: a calibrated model also brings inputs to
    # its training images' detail level (`ModelMeta.source_short_side`), and ranking runs through different input
    # paths would compare the paths as much as the weights.
    singles = [_score(score_images(m, metas[0], val_paths, progress=progress).logits, y, log_prior) for m, _ in loaded]
    order = sorted(range(len(paths)), key=lambda i: -singles[i]["score"])
    work = loaded[0][0]

    def soup_score(members: list[int]) -> dict[str, float]:
        work.load_state_dict(average_state_dicts([states[i] for i in members]))
        reset_batchnorm(work, metas[0], bn_paths)
        return _score(score_images(work, metas[0], val_paths, progress=progress).logits, y, log_prior)

    steps = []
    if greedy:
        chosen, best = [order[0]], singles[order[0]]
        for i in tqdm(order[1:], desc="greedy soup", disable=not progress or None):
            trial = soup_score([*chosen, i])
            kept = trial["score"] >= best["score"]
            steps.append({"add": names[i], "val": trial, "kept": kept})
            if kept:
                chosen, best = [*chosen, i], trial
    else:
        chosen = order
        best = soup_score(chosen)

    # Rebuild the chosen soup (the work model holds the last trial) and save it with the best run's contract.
    if len(chosen) == 1:
        work.load_state_dict(states[chosen[0]])
    else:
        work.load_state_dict(average_state_dicts([states[i] for i in chosen]))
        reset_batchnorm(work, metas[0], bn_paths)
    report = {
        "recipe": "greedy" if greedy else "uniform",
        "ingredients": [{"model": names[i], "val": singles[i]} for i in order],
        "steps": steps,
        "chosen": [names[i] for i in chosen],
        "val": best,
        "selected_on": f"val split ({len(val_paths)} images), balanced accuracy + accuracy at the best tau",
        "batchnorm": f"re-estimated on {len(bn_paths)} training images" if len(chosen) > 1 else "kept",
    }
    base = metas[chosen[0]]
    # The decision rule, temperature and OOD gate of a run describe that run, not the soup: refit them afterwards
    # (`dermsight calibrate`, `dermsight tune-decision`).
    meta = base.unfitted(metrics={"soup": report})
    save_model(out, work.cpu(), meta)
    report["model"] = str(out)
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{report['recipe']} soup, chosen on the {report['selected_on']}:"]
    for ing in report["ingredients"]:
        v = ing["val"]
        lines.append(
            f"  {ing['model']}: val balanced accuracy {v['balanced_accuracy']:.3f}, accuracy {v['accuracy']:.3f} "
            f"(tau {v['tau']:.2f})"
        )
    for s in report["steps"]:
        v = s["val"]
        verdict = "kept" if s["kept"] else "left out"
        lines.append(
            f"  + {s['add']}: soup {v['balanced_accuracy']:.3f} / {v['accuracy']:.3f} (tau {v['tau']:.2f}) -> {verdict}"
        )
    v = report["val"]
    lines.append(
        f"soup of {', '.join(report['chosen'])}: val balanced accuracy {v['balanced_accuracy']:.3f}, accuracy "
        f"{v['accuracy']:.3f} (BatchNorm {report['batchnorm']}); written to {report['model']}"
    )
    return lines
