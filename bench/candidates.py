"""Every candidate default model side by side, from the figures its model file records.

    .venv/bin/python bench/candidates.py \
        "B0=runs/b0/model.safetensors" "M1 (bundled)=src/dermsight/assets/default.safetensors" \
        --out bench/generalization.md

Training writes each model's validation and held-out test figures into the file (`dermsight train`, `calibrate`,
`tune-decision`); `scripts/record_external.py` adds what the app answers on labelled sets from other sources. This
script reads those records and scores nothing itself, so a table made from the same files is the same table. With
``--out`` the two tables replace the block between ``<!-- candidates -->`` and ``<!-- /candidates -->`` in that file
(the rest of the file is kept), so a benchmark page can hold them above its own longer tables.

Each model's internal figures are on its own lesion-grouped split: models trained on different sources were tested
on different images, which the *trained on* column says. External sets are matched by the folder name in brackets at
the end of their recorded name, so "ISIC Archive (isic_archive_val224)" and "ISIC Archive nevi and melanomas
(isic_archive_val224)" are one set.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dermsight.models.bundle import ModelLoadError, read_meta
from dermsight.models.meta import ModelMeta

START, END = "<!-- candidates -->", "<!-- /candidates -->"
NON_LESION = "non-lesion pictures rejected"


def pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def num(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def set_key(name: str) -> str:
    """The folder in brackets that ends a recorded set name, else the whole name."""
    m = re.search(r"\(([^()]+)\)\s*$", name)
    return m.group(1) if m else name


def refused_of(text: str | None) -> str:
    """'90.9% of 22 (...)' -> '20 of 22': the built-in non-lesion pictures a model refuses, as a count."""
    m = re.match(r"\s*([\d.]+)% of (\d+)", text or "")
    if not m:
        return ""
    share, n = float(m.group(1)), int(m.group(2))
    return f"{round(share * n / 100)} of {n}"


def internal_row(label: str, meta: ModelMeta) -> str:
    m = meta.metrics
    val, test, decision = m.get("val") or {}, m.get("test") or {}, m.get("decision") or {}
    referral = (decision.get("referral") or {}).get("pooled") or {}
    rejection = m.get("rejection") or {}
    non_lesion = next((v for k, v in rejection.items() if k.startswith(NON_LESION)), None)
    sources = ", ".join(
        s.name + (" (shown at its true shape)" if s.display_aspect else "") for s in meta.training_data.sources
    )
    archs = [spec["architecture"] for spec in meta.member_specs or ()] or [meta.architecture]
    net = " + ".join(archs) + (", 8 views" if meta.tta else ", 1 view")
    test_ref = test.get("referral") or {}
    return (
        f"| {label} | {net} | {sources} | {num(val.get('balanced_accuracy'))} / {num(val.get('accuracy'))} | "
        f"{pct(meta.refer_from)} ({pct(referral.get('melanomas_referred'))} of melanomas) | "
        f"{num(test.get('balanced_accuracy'))} / {num(test.get('accuracy'))} | {num(test.get('macro_auc'))} | "
        f"{num(test.get('ece'))} | {pct(test_ref.get('mel'))} / {pct(test_ref.get('nv'))} | "
        f"{refused_of(non_lesion)} |"
    )


def external_rows(label: str, meta: ModelMeta) -> list[tuple[str, str]]:
    rows = []
    for name, f in sorted((meta.metrics.get("external") or {}).items()):
        mel, nv = f.get("melanomas_sent"), f.get("nevi_sent")
        margin = "" if mel is None or nv is None else f"{mel - nv:.3f}"
        ci = f.get("balanced_accuracy_ci95")
        ba = num(f.get("balanced_accuracy")) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        key, auc, refused = set_key(name), num(f.get("mel_vs_nv_auc")), pct(f.get("refused"))
        images = f"{f.get('n')} ({f.get('melanomas')} mel, {f.get('nevi')} nv)"
        text = f"| {label} | {key} | {images} | {pct(mel)} | {pct(nv)} | {margin} | {refused} | {ba} | {auc} |"
        rows.append((key, text))
    return rows


def tables(models: list[tuple[str, ModelMeta]]) -> str:
    internal = [
        "| candidate | network, views a photo | trained on | val balanced accuracy / accuracy "
        "| referral threshold (validation melanomas sent) | test balanced accuracy / accuracy | test macro AUC "
        "| test ECE | test melanomas / nevi referred | built-in non-lesion pictures refused |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ] + [internal_row(label, meta) for label, meta in models]
    by_set: dict[str, list[str]] = {}
    for label, meta in models:
        for key, text in external_rows(label, meta):
            by_set.setdefault(key, []).append(text)
    external = [
        "| candidate | set | images | melanomas sent to a doctor | nevi sent to a doctor | margin | refused | "
        "balanced accuracy | mel vs nv AUC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ] + [text for key in sorted(by_set) for text in by_set[key]]
    return "\n".join(internal) + "\n\n" + "\n".join(external) + "\n"


def replace_block(page: str, block: str) -> str:
    if START not in page or END not in page:
        raise ValueError(f"the page has no {START} ... {END} block to replace")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="NAME=FILE", help="a candidate's model file, in table order")
    ap.add_argument("--out", type=Path, help="a Markdown page whose candidates block is replaced")
    args = ap.parse_args(argv)
    models = []
    for spec in args.models:
        label, sep, file = spec.partition("=")
        if not sep:
            ap.error(f"{spec!r}: expected NAME=FILE")
        try:
            models.append((label, read_meta(Path(file))))
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    block = tables(models)
    if args.out:
        try:
            args.out.write_text(replace_block(args.out.read_text(), block))
        except (OSError, ValueError) as e:
            print(f"error: {args.out}: {e}", file=sys.stderr)
            return 2
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
