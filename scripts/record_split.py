"""Record a model's split as a typed record, with the ids of its train and val images, in a model file of the earlier
format (which stored the split as a sentence of sizes, without which images were in it).

    .venv/bin/python scripts/record_split.py src/dermsight/assets/default.safetensors runs/default/split.csv

The split manifest must be the one the model was trained on: the script remakes nothing, it reads the manifest's
parts and refuses when their sizes, or their fingerprint where the model recorded one, differ from the model's own
record. The weights are kept byte for byte (`models.bundle.update_meta`); only the metadata changes, so that
`dermsight evaluate` can say when it scores images the model learned from.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from dermsight.data.manifest import LABEL_COLUMNS, read_split_manifest
from dermsight.data.problems import DataError
from dermsight.models.bundle import ModelLoadError, read_meta, update_meta
from dermsight.models.meta import split_mismatch
from dermsight.models.records import SplitRecord


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="model file (.safetensors) to update in place")
    ap.add_argument("split", help="the split manifest the model was trained on (a split.csv or a run folder)")
    args = ap.parse_args(argv)
    try:
        meta = read_meta(args.model)
        df = read_split_manifest(args.split)
    except (ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if meta.split is None or not meta.split.sizes:
        print(f"error: {args.model} records no split sizes to check the manifest against", file=sys.stderr)
        return 2
    why = split_mismatch(meta, df)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    old = meta.split
    record = SplitRecord.of(df, old.seed, LABEL_COLUMNS[meta.taxonomy], method=old.method)
    update_meta(args.model, replace(meta, split=record))
    print(f"{args.model}: {record.describe()}; {len(record.held_in)} train and val image ids recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
