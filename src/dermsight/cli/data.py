"""`dermsight data manifest|split|cache|download`: datasets into manifests, lesion-grouped splits, the image cache."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dermsight.cli.common import (
    EXIT_DROPPED,
    EXIT_OK,
    EXIT_USAGE,
    output_file,
    print_table,
    problems_path,
    report_problems,
    whole,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from dermsight.data.manifest import FORMATS

    data = sub.add_parser("data", help="ingest datasets: manifest, split, cache, download")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    m = dsub.add_parser("manifest", help="read a dataset folder or CSV into a manifest, checking every image")
    m.add_argument(
        "source",
        nargs="+",
        help="dataset folder(s) or CSV(s) (labels.csv, HAM10000, ISIC 2019, isic-cli, class folders); several are "
        "combined into one manifest whose `source` column tells them apart",
    )
    m.add_argument("--out", required=True, help="manifest CSV to write (problems go beside it, *.problems.csv)")
    m.add_argument("--format", choices=FORMATS, help="dataset layout (default: detected)")
    m.add_argument("--quick", action="store_true", help="read image headers only (misses truncated files)")
    m.add_argument("--no-verify", action="store_true", help="do not open images at all")
    m.add_argument(
        "--display-aspect",
        action="append",
        default=[],
        metavar="FOLDER=W:H",
        help="a source stored squashed (e.g. isic2017_256=4:3): its images are stretched back to W:H once, as "
        "copies in the cache folder, and the manifest points at them (as the training option display_aspect does)",
    )
    m.set_defaults(func=cmd_data_manifest)

    s = dsub.add_parser("split", help="add lesion-grouped train/val/test splits and CV folds to a manifest")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="manifest CSV with `split` and `fold` columns")
    s.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    s.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
    s.add_argument("--seed", type=whole(0), default=0)
    s.add_argument("--folds", type=whole(2), default=5, help="cross-validation folds over train+val (default 5)")
    s.add_argument("--label", default="label_ham7", help="column to stratify on (default label_ham7)")
    s.set_defaults(func=cmd_data_split)

    c = dsub.add_parser("cache", help="decode and resize every image once into a fast memory-mapped cache")
    c.add_argument("manifest")
    c.add_argument("--size", type=whole(1), default=224, help="shorter side in pixels (never enlarged; default 224)")
    c.add_argument("--cache-dir", help="cache root (default $DERMSIGHT_CACHE or ~/.cache/dermsight)")
    c.add_argument("--workers", type=whole(1), help="decoding threads (default: 2 per core, at most 8)")
    c.set_defaults(func=cmd_data_cache)

    d = dsub.add_parser("download", help="download ISIC Archive images with the official isic-cli")
    d.add_argument("--out", required=True, help="folder for images and metadata.csv")
    d.add_argument("--search", default="", help="ISIC Archive query, e.g. 'image_type:dermoscopic'")
    d.add_argument("--collections", default="", help="comma-separated collection ids (`isic collection list`)")
    d.add_argument("--limit", type=whole(0), default=0, help="at most this many images (0: all matching)")
    d.add_argument("--dry-run", action="store_true", help="print the isic command without running it")
    d.set_defaults(func=cmd_data_download)


def _display_aspects(pairs: list[str], sources: list[Path]) -> dict[str, float]:
    """``--display-aspect FOLDER=W:H`` options as {folder name: ratio}; a name that is no source's is refused."""
    from dermsight.data.aspect import parse_aspect
    from dermsight.data.problems import DataError

    names = {s.name for s in sources}
    out = {}
    for pair in pairs:
        name, sep, ratio = pair.partition("=")
        if not sep or name not in names:
            raise DataError(
                f"--display-aspect {pair!r}: expected FOLDER=W:H with FOLDER the name of a source "
                f"({', '.join(sorted(names))})"
            )
        try:
            out[name] = parse_aspect(ratio)
        except ValueError as e:
            raise DataError(f"--display-aspect {pair!r}: {e}") from None
    return out


def cmd_data_manifest(args: argparse.Namespace) -> int:
    from dermsight.data.aspect import restore_sources
    from dermsight.data.manifest import build_manifest, class_counts, combine, label_files, save_manifest

    verify = "none" if args.no_verify else ("header" if args.quick else "full")
    sources = [Path(s) for s in args.source]
    source = " + ".join(map(str, sources))
    # The label files a source folder holds are read too, so they count as inputs: `--out DATA/labels.csv` would
    # replace the user's labels with the manifest.
    output_file(args.out, [f for s in sources for f in label_files(s)], writes="a manifest (.csv)")
    aspects = _display_aspects(args.display_aspect, sources)
    t0 = time.perf_counter()
    ingests = [build_manifest(s, fmt=args.format, verify=verify) for s in sources]
    ingest = combine(restore_sources(sources, ingests, aspects, None, progress=True))
    out, kept = Path(args.out), len(ingest.manifest)
    if kept:  # an empty result never replaces a manifest already there
        save_manifest(ingest.manifest, out)
    dt = time.perf_counter() - t0
    written = f"manifest written to {out}" if kept else "no manifest written"
    print(f"format: {ingest.format}; {ingest.rows_read} row(s) read, {kept} kept ({dt:.1f} s); {written}")
    if kept:
        by = "source" if ingest.manifest["source"].nunique() > 1 else None
        print_table(class_counts(ingest.manifest, by=by), "class counts:")
    elif ingest.labels_read:
        print(
            "labels in the source (no row kept): "
            + ", ".join(f"{k} {v}" for k, v in sorted(ingest.labels_read.items(), key=lambda kv: -kv[1]))
        )
    # Nothing written when nothing was kept: not the manifest, and not a problem list that would sit beside an
    # earlier run's manifest (the reasons are summarised below either way).
    code = report_problems(ingest.problems, problems_path(out) if kept else None)
    if not kept:
        # Nothing to train or evaluate on is unusable input, not a success with some rows dropped.
        print(f"error: no usable image in {source}, so no manifest was written", file=sys.stderr)
        return EXIT_USAGE
    return code


def cmd_data_split(args: argparse.Namespace) -> int:
    import pandas as pd

    from dermsight.data.manifest import load_manifest, save_manifest
    from dermsight.data.split import SplitConfig, check_split, split_manifest

    # Checked before reading: the split is written over neither its input (an earlier split would be lost) nor a model.
    out = output_file(args.out, [args.manifest], writes="a split manifest (.csv)")
    df = load_manifest(Path(args.manifest))
    if df.empty:
        raise ValueError(f"{args.manifest} lists no images: nothing to split")
    if args.label not in df and args.label != "label_ham7":  # the default falls back to `label` (split_manifest)
        raise ValueError(f"{args.manifest} has no column {args.label!r} to stratify on")
    cfg = SplitConfig(val=args.val, test=args.test, seed=args.seed, folds=args.folds, label=args.label)
    out_df = split_manifest(df, cfg)
    out = save_manifest(out_df, out)
    label = cfg.label if cfg.label in out_df else "label"
    used = out_df[out_df["split"] != "excluded"]
    print(f"split {len(used)} image(s) grouped by lesion/patient (seed {cfg.seed}); written to {out}")
    counts = pd.crosstab(used[label], used["split"], margins=True, margins_name="total")
    counts = counts[[c for c in ("train", "val", "test", "total") if c in counts.columns]]
    print_table(counts, f"images per class ({label}) and split:")
    shares = used["split"].value_counts(normalize=True).reindex(["train", "val", "test"]).fillna(0)
    print("\nshares: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    if (out_df["split"] == "excluded").any():
        print(f"{int((out_df['split'] == 'excluded').sum())} image(s) without a {label} were left out of all splits")
    issues = check_split(out_df, label)
    for msg in issues:
        print(f"warning: {msg}", file=sys.stderr)
    return EXIT_DROPPED if issues else EXIT_OK


def cmd_data_cache(args: argparse.Namespace) -> int:
    from dermsight.data.cache import build_cache
    from dermsight.data.manifest import load_manifest

    df = load_manifest(Path(args.manifest))
    res = build_cache(df, args.size, root=Path(args.cache_dir) if args.cache_dir else None, workers=args.workers)
    n_ok = len(res.cache) - len(res.problems)
    if res.reused:
        print(f"reusing cache {res.cache.folder} ({n_ok} image(s) at {args.size}px)")
    else:
        rate = len(res.cache) / res.seconds if res.seconds else float("inf")
        size_mb = int(res.cache.meta["nbytes"]) / 2**20
        print(
            f"cached {n_ok} image(s) at {args.size}px in {res.seconds:.1f} s ({rate:.0f} images/s), "
            f"{size_mb:.0f} MB at {res.cache.folder}"
        )
    return report_problems(res.problems, res.cache.folder / "problems.csv" if res.problems else None)


def cmd_data_download(args: argparse.Namespace) -> int:
    import shlex

    from dermsight.data.download import DownloadRequest, isic_command, run_download

    req = DownloadRequest(Path(args.out), search=args.search, collections=args.collections, limit=args.limit)
    print("running: " + shlex.join(isic_command(req)))
    if args.dry_run:
        return EXIT_OK
    rc = run_download(req)
    if rc == 0:
        print(f"done; next: dermsight data manifest {req.out} --out {req.out}/manifest.csv")
    return rc
