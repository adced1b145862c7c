"""A labelled folder of 224 px square centre crops from one split of a run: data shaped like the external test set the
default model is checked on (square centre crops of 4:3 dermoscopy frames), for `dermsight evaluate --data DIR`.

    .venv/bin/python scripts/square_crops.py runs/default --split test --out runs/test_square224
    dermsight evaluate --data runs/test_square224 --out runs/eval_square224

Writes DIR/images/<image_id>.png (lossless: no second JPEG pass on top of the source's) and DIR/labels.csv
(`image,label`, and `lesion_id` where the split has it). Crops come from
`dermsight.posthoc.calibrate.square_crop`, the same function calibration uses for its `test_square224` figures.
HAM10000 images here are 200x150, so the crops are enlarged 150 px squares, not the sharper crops of 600x450
originals; the model brings both to its training detail first (`match_detail`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from dermsight.data.images import ImageError, load_rgb
from dermsight.data.manifest import read_split_manifest
from dermsight.data.problems import DataError
from dermsight.inference.preprocess import square_crop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a split manifest (split.csv) or a training run folder that holds one")
    ap.add_argument("--split", default="test", help="which split to crop (default: test)")
    ap.add_argument("--size", type=int, default=224, help="side of the square crops in pixels (default 224)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (images/ and labels.csv)")
    args = ap.parse_args(argv)
    try:
        df = read_split_manifest(args.data)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = df[df["split"] == args.split]
    if rows.empty:
        print(
            f"error: no images in split {args.split!r} (splits: {', '.join(sorted(df['split'].unique()))})",
            file=sys.stderr,
        )
        return 2
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    labels, skipped = [], 0
    for r in rows.itertuples():
        try:
            image = load_rgb(r.path)
        except ImageError as e:
            print(f"skipped {r.path}: {e}", file=sys.stderr)
            skipped += 1
            continue
        name = f"images/{Path(r.path).stem}.png"
        Image.fromarray(square_crop(image, args.size)).save(args.out / name)
        labels.append((name, r.label, getattr(r, "lesion_id", None)))
    table = pd.DataFrame(labels, columns=["image", "label", "lesion_id"])
    if table["lesion_id"].isna().all():
        table = table.drop(columns="lesion_id")
    # lesion_id, where the split has it, lets `evaluate` resample a lesion's photos together for its intervals.
    table.to_csv(args.out / "labels.csv", index=False)
    print(f"{len(labels)} square crops of {args.size} px in {args.out} ({skipped} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
