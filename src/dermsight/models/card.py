"""A model card rendered from the model's own contract, so the card can never disagree with the model file.

`dermsight model-card` writes it as Markdown (MODEL_CARD.md for the bundled model); the web app's "about the model"
page shows the same facts.
"""

from __future__ import annotations

from typing import Any

from dermsight.domain.classes import CONDITIONS
from dermsight.models.meta import ModelMeta

INTENDED_USE = """\
**Intended use.** A research tool and an aid: it suggests which of seven common pigmented-lesion categories a
*dermoscopic* image most resembles, so that people and dermatologists can decide what to look at more closely. It is
**not a medical device**, has not been clinically validated, and does not give a diagnosis. A low-risk answer is no
reason to ignore a lesion that changes, bleeds, itches or worries you.

**Limits.**
- Trained on dermoscopy (images taken through a dermatoscope, close-up, lit, often with a circular vignette). Ordinary
  phone photos of skin look different; results on them are less reliable, and the app tries to reject images that do
  not look like the training data (a statistical check, not a guarantee).
- HAM10000 is a collection of common *pigmented* lesions: few of its melanomas are pink or skin-coloured
  (amelanotic), and it was not built for spots under nails or on the mouth, genitals or eyes. Do not use the model
  for those.
- It misses melanomas. Even on held-out images like its training data, the web app's advice tells some melanomas
  "probably harmless" (`bench/triage.py` measures how many); on other images it is likely to miss more. A "probably
  harmless" answer is never a reason not to see a doctor.
- Seven classes only (HAM10000): actinic keratosis / intraepithelial carcinoma, basal cell carcinoma, benign
  keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevus, vascular lesions. Any other condition (eczema,
  psoriasis, infections, rarer tumours) is forced into one of these seven or rejected.
- HAM10000 comes from two centres (Vienna, Austria, and Queensland, Australia); it and the ISIC Archive images
  mostly show light skin (Fitzpatrick types I-III). Performance on darker skin types is unknown and likely worse.
- The held-out metrics below come from lesions of the collections the model was trained on; on images from other
  clinics, cameras and populations they are usually lower (where recorded, "On images from other sources" shows by
  how much).
"""


def _fmt(v: Any, ci: Any = None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if ci:
        s += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return s


def _source(name: str) -> str:
    """A manifest's source ("labels-csv:ham10000": reader, then folder) as the folder's name."""
    return name.partition(":")[2] or name


def _share(rate: float | None, n: int) -> str:
    return "n/a" if rate is None else f"{rate:.1%} of {n}"


def _by_source(s: dict) -> list[str]:
    """The split's figures per source, when it holds several: a pooled figure hides where the model fails."""
    rows = s.get("by_source") or {}
    if not rows:
        return []
    lines = [
        "",
        "By source (the app's advice replayed on every image, no refusals applied):",
        "",
        "| source | images | balanced accuracy | accuracy | melanoma vs nevus AUC | melanomas sent to a doctor "
        "| nevi sent to a doctor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for src, m in rows.items():
        ref = m.get("referral") or {}
        ci = m.get("ci95", {})
        lines.append(
            f"| {_source(src)} | {m['n']} | {_fmt(m['balanced_accuracy'], ci.get('balanced_accuracy'))} | "
            f"{_fmt(m['accuracy'])} | {_fmt(m.get('mel_vs_nv_auc'))} | {_fmt(ref.get('mel'))} | {_fmt(ref.get('nv'))} |"
        )
    return lines


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _external(sets: dict) -> list[str]:
    """Sets from other sources, never used to train or select the model (`scripts/record_external.py`): what the
    app tells people there, refusals included."""
    if not sets:
        return []
    lines = [
        "",
        "## On images from other sources",
        "",
        "Labelled sets the model never trained on, scored as the app answers (`dermsight evaluate --gates`): a refused "
        "image gets no advice, so a refused melanoma counts as not sent to a doctor.",
        "",
        "| set | images | melanomas sent to a doctor | nevi sent to a doctor | refused | melanoma vs nevus AUC "
        "| balanced accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in sets.items():
        lines.append(
            f"| {name} | {e['n']} ({e['melanomas']} mel, {e['nevi']} nv) | {_pct(e['melanomas_sent'])} | "
            f"{_pct(e['nevi_sent'])} | {_pct(e['refused'])} | {_fmt(e['mel_vs_nv_auc'])} | "
            f"{_fmt(e['balanced_accuracy'], e.get('balanced_accuracy_ci95'))} |"
        )
    return lines


def render_model_card(meta: ModelMeta, model_file: str = "", reproduce: str = "", notes: tuple[str, ...] = ()) -> str:
    m = meta.metrics or {}
    ens = m.get("ensemble", {}).get("members", [])
    ensemble_line = []
    mixed = bool(meta.member_specs)
    if meta.members > 1:
        seeds = f" (seeds {', '.join(str(e['seed']) for e in ens)})" if ens else ""
        stored = f"; weights stored as {m['ensemble']['stored_as']}" if ens else ""
        what = "one training recipe on different backbones" if mixed else "one training recipe"
        ensemble_line.append(
            f"- An ensemble of {meta.members} runs of {what}{seeds}: the networks' logits are averaged, "
            f"then the decision rule and temperature below apply{stored}."
        )
        if mixed:
            ensemble_line.append(
                "- One input serves every member, resized as the first member's: members trained with another "
                "normalisation get a fixed per-channel map to their own (stored in the file's metadata)."
            )
    archs = [x["architecture"] for x in meta.member_specs] if mixed else [meta.architecture]
    arch_text = " + ".join(f"`{a}`" for a in archs)
    lines = [
        f"# Model card: {meta.network}, {meta.taxonomy}, {meta.num_classes} classes",
        "",
        f"File: `{model_file}`" if model_file else "",
        "",
        INTENDED_USE,
        "## Model",
        "",
        f"- Architecture: {arch_text} (timm), input {meta.input_size}x{meta.input_size} px, "
        "eval preprocessing: "
        + (f"Shades of Gray colour constancy (p = {meta.colour_constancy}), " if meta.colour_constancy else "")
        + f"shorter side to {meta.resize_size} px, centre crop, mean {list(meta.mean)}, "
        f"std {list(meta.std)}, {meta.interpolation} interpolation.",
        *ensemble_line,
        f"- Started from: {meta.weights.get('description', meta.weights.get('source'))} "
        f"(source `{meta.weights.get('source')}`)"
        + ("; this is the first member's start, the others' are in the members table." if mixed else "."),
        "- Classes (logit order): "
        + ", ".join(f"{c} ({n})" for c, n in zip(meta.classes, meta.class_names, strict=True))
        + ".",
        f"- Calibration: temperature {meta.temperature:.3f}"
        + (" (fitted on the validation split)" if meta.temperature != 1.0 else " (not calibrated)")
        + ".",
        f"- Created {meta.created} with dermsight {meta.dermsight_version}.",
        "",
        "## Training data",
        "",
        f"- {meta.training_data.describe() if meta.training_data else 'not recorded'}",
        f"- Split: {meta.split.describe() if meta.split else 'not recorded'}",
        "- Licence: HAM10000 / ISIC data are CC BY-NC 4.0 (Tschandl, Rosendahl & Kittler, Sci. Data 5:180161, 2018);"
        " this model inherits the non-commercial restriction.",
    ]
    if reproduce:
        lines += ["", f"Reproduce: `{reproduce}`"]
    lines += [f"\n{n}" for n in notes]
    d = m.get("decision")
    if d:
        lines += [
            "",
            "## Decision rule",
            "",
            f"- Test-time augmentation (mean logits over the 8 flips/rotations): {'on' if d['tta'] else 'off'}.",
            f"- Prior correction: tau = {d['tau']} x log(training class prior) added to the logits, undoing part of "
            "the class-weighted loss's shift towards rare classes (tau 0 = balanced rule, 1 = frequency rule).",
            f"- Both chosen on the {d['chosen_on']}; the temperature was refitted for this rule. The test split "
            "below was scored once, after the choice.",
        ]
    if ens:
        lines += [
            "",
            "## Ensemble members",
            "",
            "Each run alone on the validation split, as recorded in its own file (under its own tuned decision rule "
            "where it had one, else plain argmax):",
            "",
            "| ensemble member | "
            + ("architecture | started from | " if mixed else "")
            + "seed | val balanced accuracy | val accuracy | member's own rule |",
            "|---|" + ("---|---|" if mixed else "") + "---:|---:|---:|---|",
        ]
        lines += [
            f"| `{e['model']}` | "
            + (f"{e.get('architecture')} | `{e.get('weights')}` | " if mixed else "")
            + f"{e['seed']} | {_fmt(e['val'].get('balanced_accuracy'))} | "
            f"{_fmt(e['val'].get('accuracy'))} | {e.get('rule', 'n/a')} |"
            for e in ens
        ]
    cfg = meta.config or {}
    if cfg:
        keys = ("epochs", "batch_size", "lr", "weight_decay", "imbalance", "label_smoothing", "input_size", "seed")
        lines += ["", "Training config: " + ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg) + "."]
    for split in ("val", "test"):
        s = m.get(split)
        if not s:
            continue
        ci = s.get("ci95", {})
        title = "validation split (used for model selection)" if split == "val" else "held-out test split"
        lines += [
            "",
            f"## Metrics on the {title}",
            "",
            f"{s['n']} images of lesions never seen in training (95% bootstrap confidence intervals).",
            "",
            "| metric | value |",
            "|---|---|",
            "| balanced accuracy (mean per-class recall, ISIC metric) | "
            f"{_fmt(s['balanced_accuracy'], ci.get('balanced_accuracy'))} |",
            f"| accuracy | {_fmt(s['accuracy'], ci.get('accuracy'))} |",
            f"| macro ROC AUC | {_fmt(s['macro_auc'], ci.get('macro_auc'))} |",
            f"| expected calibration error | {_fmt(s.get('ece'))} |",
        ]
        if s.get("ece_before_temperature") is not None:
            lines.append(f"| ECE before temperature scaling | {_fmt(s['ece_before_temperature'])} |")
        recall = s.get("recall", {})
        if recall:
            lines += ["", "| class | recall |", "|---|---:|"]
            lines += [f"| {c} ({CONDITIONS[c].name}) | {_fmt(r)} |" for c, r in recall.items()]
        lines += _by_source(s)
    lines += _external(m.get("external") or {})
    ref = (d or {}).get("referral")
    if ref:
        lines += [
            "",
            "## Referral threshold",
            "",
            f"The advice sends a person to a doctor when malignant and pre-malignant classes together reach "
            f"**{ref['refer_from']:.0%}** (or the top class is one, or the model is uncertain). Chosen on the "
            f"validation split, every source's images pooled: the highest whole percent that sends at least "
            f"{ref['target']:.0%} of the validation melanomas to a doctor"
            + ("" if ref["met"] else " (not reached even at 1%)")
            + ". On those images:",
            "",
            "| validation images | melanomas sent to a doctor | nevi sent to a doctor |",
            "|---|---:|---:|",
        ]
        for name, r in [("all sources", ref["pooled"]), *ref.get("by_source", {}).items()]:
            lines.append(
                f"| {_source(name)} | {_share(r['melanomas_referred'], r['melanomas'])} | "
                f"{_share(r['nevi_referred'], r['nevi'])} |"
            )
    for key, title in (("rejection", "Image gate and out-of-distribution rejection"),):
        if m.get(key):
            lines += ["", f"## {title}", ""]
            lines += [f"- {k}: {v}" for k, v in m[key].items()]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
