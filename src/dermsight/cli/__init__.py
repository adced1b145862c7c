"""The `dermsight` command: thin argument parsing over library functions that the tests call too.

Exit codes: 0 success; 1 finished but some items were dropped (see the problems file); 2 bad usage or unusable input
(nothing written); 70 an internal error (a bug: the message says how to get the traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dermsight.inference.types import BACKENDS

EXIT_OK, EXIT_DROPPED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 70


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high], refused at parse time with a usage message (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def _share(text: str) -> float:
    """argparse type: a share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a share, e.g. 0.01), got {value}")
    return value


def _output_file(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (), writes: str | None = None
) -> Path:
    """``out`` as a file this command may write: not a folder, and none of the files the command reads (writing the
    result over its own input would destroy what the user had). ``writes``: what the command writes when that is not
    a model (ONNX, Markdown); a model's name (.safetensors) is then refused, since an ONNX file or a model card
    written there replaced another run's model without a word. Raises ValueError (a usage error, exit 2)."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name inside it")
    if writes and path.suffix.lower() == ".safetensors":
        raise ValueError(f"--out {out} is a model file's name, and this command writes {writes}; give another name")
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise ValueError(f"--out {out} is one of this command's inputs; write the result to another file")
    return path


def _model_and_out(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The model that ``calibrate`` or ``tune-decision`` reads (``--model``, else the default model) and the file it
    writes (``--out``, else the model itself, None here). Both are checked before minutes of scoring.

    The bundled default model is never rewritten in place: the app, ``predict`` and ``evaluate`` serve it, and a
    calibration on some other split would silently replace the shipped one."""
    from dermsight.models.bundle import DEFAULT_MODEL, default_model_path

    model = Path(args.model) if args.model else default_model_path()
    out = _output_file(args.out) if args.out else None
    target = out or model
    if target.exists() and DEFAULT_MODEL.exists() and target.samefile(DEFAULT_MODEL):
        raise ValueError(
            f"{target} is the bundled default model, which is not rewritten in place: give --out FILE, then use it "
            "with --model FILE (or DERMSIGHT_MODEL=FILE for the app)"
        )
    return model, out


def _print_table(df, title: str) -> None:  # pandas frame -> aligned text
    print(f"\n{title}")
    print(df.to_string())


def _report_problems(problems, problems_file: Path | None) -> int:
    from dermsight.data.problems import summarise, write_problems

    if problems_file is not None:
        write_problems(problems, problems_file)
    if not problems:
        return EXIT_OK
    print("\n" + summarise(problems), file=sys.stderr)
    if problems_file is not None:
        print(f"full list: {problems_file}", file=sys.stderr)
    return EXIT_DROPPED


def problems_path(out: Path) -> Path:
    return out.with_name(out.stem + ".problems.csv")


# ----------------------------------------------------------------------------------------------------- data commands


def cmd_data_manifest(args: argparse.Namespace) -> int:
    from dermsight.data.manifest import build_manifest, class_counts, label_files, save_manifest

    verify = "none" if args.no_verify else ("header" if args.quick else "full")
    source = Path(args.source)
    # The label files a source folder holds are read, so they are inputs too: `--out DATA/labels.csv` replaced the
    # user's labels with the manifest (a review helper's finding).
    _output_file(args.out, label_files(source))
    t0 = time.perf_counter()
    ingest = build_manifest(source, fmt=args.format, verify=verify)
    out, kept = Path(args.out), len(ingest.manifest)
    if kept:  # an empty result never replaces a manifest already there
        save_manifest(ingest.manifest, out)
    dt = time.perf_counter() - t0
    written = f"manifest written to {out}" if kept else "no manifest written"
    print(f"format: {ingest.format}; {ingest.rows_read} row(s) read, {kept} kept ({dt:.1f} s); {written}")
    if kept:
        _print_table(class_counts(ingest.manifest), "class counts:")
    elif ingest.labels_read:
        print(
            "labels in the source (no row kept): "
            + ", ".join(f"{k} {v}" for k, v in sorted(ingest.labels_read.items(), key=lambda kv: -kv[1]))
        )
    # Nothing written when nothing was kept: not the manifest, and not a problem list that would sit beside an
    # earlier run's manifest (the reasons are summarised below either way).
    code = _report_problems(ingest.problems, problems_path(out) if kept else None)
    if not kept:
        # Nothing to train or evaluate on is unusable input, not a success with some rows dropped.
        print(f"error: no usable image in {source}, so no manifest was written", file=sys.stderr)
        return EXIT_USAGE
    return code


def cmd_data_split(args: argparse.Namespace) -> int:
    from dermsight.data.manifest import load_manifest, save_manifest
    from dermsight.data.split import SplitConfig, check_split, split_manifest

    df = load_manifest(Path(args.manifest))
    if df.empty:
        raise ValueError(f"{args.manifest} lists no images: nothing to split")
    if args.label not in df and args.label != "label_ham7":  # the default falls back to `label` (split_manifest)
        raise ValueError(f"{args.manifest} has no column {args.label!r} to stratify on")
    cfg = SplitConfig(val=args.val, test=args.test, seed=args.seed, folds=args.folds, label=args.label)
    out_df = split_manifest(df, cfg)
    out = save_manifest(out_df, Path(args.out))
    label = cfg.label if cfg.label in out_df else "label"
    used = out_df[out_df["split"] != "excluded"]
    print(f"split {len(used)} image(s) grouped by lesion/patient (seed {cfg.seed}); written to {out}")
    import pandas as pd

    counts = pd.crosstab(used[label], used["split"], margins=True, margins_name="total")
    counts = counts[[c for c in ("train", "val", "test", "total") if c in counts.columns]]
    _print_table(counts, f"images per class ({label}) and split:")
    share = used["split"].value_counts(normalize=True).reindex(["train", "val", "test"]).fillna(0)
    print("\nshares: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()))
    if (out_df["split"] == "excluded").any():
        print(f"{int((out_df['split'] == 'excluded').sum())} image(s) without a {label} were left out of all splits")
    issues = check_split(out_df, label)
    for msg in issues:
        print(f"warning: {msg}", file=sys.stderr)
    return EXIT_DROPPED if issues else EXIT_OK


def cmd_data_cache(args: argparse.Namespace) -> int:
    from dermsight.data.cache import build_cache
    from dermsight.data.manifest import load_manifest

    manifest_path = Path(args.manifest)
    df = load_manifest(manifest_path)
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
    return _report_problems(res.problems, res.cache.folder / "problems.csv" if res.problems else None)


def cmd_data_download(args: argparse.Namespace) -> int:
    import shlex

    from dermsight.data.download import DownloadRequest, isic_command, run_download

    req = DownloadRequest(Path(args.out), search=args.search, collections=args.collections, limit=args.limit)
    cmd = isic_command(req)
    print("running: " + shlex.join(cmd))
    if args.dry_run:
        return EXIT_OK
    rc = run_download(req)
    if rc == 0:
        print(f"done; next: dermsight data manifest {req.out} --out {req.out}/manifest.csv")
    return rc


# ---------------------------------------------------------------------------------------------------------- training


def cmd_train(args: argparse.Namespace) -> int:
    from dermsight.training import TrainConfig, train

    overrides = dict(TrainConfig.parse_override(pair) for pair in args.set)
    # The named flags win over --set: they are the documented, specific form.
    named = {"out": args.out, "epochs": args.epochs, "seed": args.seed, "device": args.device}
    overrides |= {k: v for k, v in named.items() if v is not None} | ({"resume": True} if args.resume else {})
    cfg = TrainConfig.from_yaml(Path(args.config), **overrides) if args.config else TrainConfig(**overrides)
    if args.prepare_only:
        from dermsight.training.loop import prepare_data

        data = prepare_data(cfg)
        counts = data.manifest["split"].value_counts()
        print(
            f"{len(data.manifest)} images ready in the cache {data.cache.folder} "
            f"({', '.join(f'{s} {counts.get(s, 0)}' for s in ('train', 'val', 'test'))})"
        )
        return EXIT_OK
    train(cfg)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dermsight.evaluation.run import evaluate, held_in_words

    ev = evaluate(
        Path(args.data),
        Path(args.out),
        Path(args.model) if args.model else None,
        split=args.split,
        tta=args.tta,
        n_bootstrap=args.bootstrap,
        gates=args.gates,
    )
    m, ci = ev.metrics, ev.metrics["ci95"]

    def fmt(key: str) -> str:
        lo_hi = ci.get(key)
        value = m[key]
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" (95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else "")

    print(
        f"{m['n']} images; balanced accuracy {fmt('balanced_accuracy')}; accuracy {fmt('accuracy')}; "
        f"macro AUC {fmt('macro_auc')}; ECE {m['ece']:.3f}"
    )
    print(
        "recall per class: "
        + ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items() if v["recall"] is not None)
    )
    if args.gates:
        print(f"serving gates: {m['extra']['serving_gates']} (the metrics above count every image)")
    if m["extra"]["held_in_images"]:
        held = m["extra"]["held_in_images"]
        print(f"WARNING: {held_in_words(held, m['n'] + m['extra']['images_failed'])}", file=sys.stderr)
    print(f"report: {ev.files['report']}")
    # Written even when empty: a folder reused from an earlier run must not keep that run's problem list.
    return _report_problems(ev.problems, Path(args.out) / "problems.csv")


# --------------------------------------------------------------------------------------------------------- inference


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from dermsight.cli.output import format_table, result_record
    from dermsight.data.images import ImageError
    from dermsight.domain.knowledge import load_knowledge
    from dermsight.domain.triage import RULE, advise
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import ModelLoadError

    knowledge = load_knowledge()
    try:
        predictor = Predictor.from_path(args.model, backend=args.backend, threads=args.threads)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    explain_dir = Path(args.explain) if args.explain else None
    if explain_dir:
        explain_dir.mkdir(parents=True, exist_ok=True)  # before any work: a file in the way is a usage error
    records, failed, written = [], 0, set()
    for start in range(0, len(args.images), 32):  # 32 images decoded and held at once
        batch = args.images[start : start + 32]
        for image, result in zip(batch, predictor.predict_batch(batch, tta=args.tta), strict=True):
            advice = None if isinstance(result, ImageError) else advise(result, knowledge).to_dict()
            record = result_record(image, result, advice)
            if isinstance(result, ImageError):
                failed += 1
                print(f"error: {image}: {result}", file=sys.stderr)
            elif explain_dir and result.status == "ok":
                out, n = explain_dir / f"{Path(image).stem}_gradcam.png", 2
                while out in written:  # two inputs of the same name from different folders
                    out, n = explain_dir / f"{Path(image).stem}_{n}_gradcam.png", n + 1
                out.write_bytes(predictor.explain(image))
                written.add(out)
                record["explanation"] = str(out)
            records.append(record)
    print(json.dumps(records, indent=2) if args.json else format_table(records, advice_rule=RULE))
    return EXIT_DROPPED if failed else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from dermsight.inference.export import export_model
    from dermsight.models.bundle import ModelLoadError, default_model_path

    try:
        model_path = Path(args.model) if args.model else default_model_path()
        report, meta = export_model(
            model_path,
            _output_file(args.out, [model_path], writes="an ONNX model (.onnx)"),
            args.check_images or (),
            args.max_check,
            args.int8,
            args.threads or 1,
        )
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report.lines(meta)))
    return EXIT_OK if report.ok else EXIT_DROPPED


def _warn_if_not_the_training_split(model: Path, data: str) -> None:
    from dermsight.data.manifest import read_split_manifest
    from dermsight.models.bundle import read_meta
    from dermsight.models.meta import split_mismatch

    problem = split_mismatch(read_meta(model), read_split_manifest(data))
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dermsight.data.manifest import list_images
    from dermsight.models.bundle import ModelLoadError
    from dermsight.posthoc.calibrate import calibrate_model, report_lines

    try:
        model, out = _model_and_out(args)
        _warn_if_not_the_training_split(model, args.data)
        report = calibrate_model(
            model,
            Path(args.data),
            out,
            negatives=[p for d in args.negatives or () for p in list_images(d)],
            target_rejection=args.target_rejection,
            max_fit_images=args.max_fit_images,
            backend=args.backend,
            threads=args.threads,
        )
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report_lines(report)))
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------------- serve


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (address unknown, port taken, no permission), or None."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"cannot listen on {host!r}: {e.strerror}"
    with socket.socket(family, kind, proto) as probe:
        # As gunicorn binds: SO_REUSEADDR lets a port in TIME_WAIT be reused, never one another server listens on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            hint = "; is another server running there? choose another with --port" if e.errno == 98 else ""
            return f"cannot listen on {host}:{port}: {e.strerror}{hint}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from dermsight.domain.knowledge import KnowledgeError, load_knowledge
    from dermsight.models.bundle import ModelLoadError, default_model_path, read_meta
    from dermsight.web.app import config_from_env
    from dermsight.web.server import default_workers, serve

    # Check the model, the knowledge file and the DERMSIGHT_* settings here, once, so a mistake is one clear line
    # rather than every worker failing to boot.
    try:
        config_from_env()
        meta = read_meta(Path(args.model) if args.model else default_model_path())
        load_knowledge()
    except (ModelLoadError, KnowledgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    problem = _cannot_listen(args.host, args.port)
    if problem:
        # Otherwise gunicorn retries for seconds, logging an error each time, and exits 1.
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    workers = 1 if args.dev else (args.workers or default_workers())
    print(
        f"dermsight web app on http://{args.host}:{args.port}/ ({meta.network}, {len(meta.classes)} classes; "
        f"{'Flask development server' if args.dev else f'gunicorn, {workers} worker(s)'}); Ctrl+C stops it",
        flush=True,
    )
    serve(args.host, args.port, args.model, workers, dev=args.dev)
    return EXIT_OK


def cmd_tune_decision(args: argparse.Namespace) -> int:
    from dermsight.posthoc.decision import report_lines, tune_decision

    model, out = _model_and_out(args)
    _warn_if_not_the_training_split(model, args.data)
    report = tune_decision(model, args.data, out, report_dir=args.reports)
    print("\n".join(report_lines(report)))
    return EXIT_OK


def cmd_soup(args: argparse.Namespace) -> int:
    from dermsight.posthoc.soup import make_soup, report_lines

    out = _output_file(args.out, args.models)
    _warn_if_splits_differ(args.models)
    # Its greedy choice is made on --data's val split: another split's "val" can hold the runs' training images.
    _warn_if_not_the_training_split(Path(args.models[0]), args.data)
    report = make_soup(args.models, args.data, out, greedy=not args.uniform, device=args.device)
    print("\n".join(report_lines(report)))
    return EXIT_OK


def _warn_if_splits_differ(models: Sequence[str]) -> None:
    """Runs combined from different splits (cross-validation folds, say) can be averaged, but no split is then
    held out from all of them: the temperature, gate and decision rule fitted on one run's val split, and the
    scores on its test split, would include images another member trained on."""
    from dermsight.models.bundle import read_meta

    records = [read_meta(m).split for m in models]
    splits = {r.describe() if r else "not recorded" for r in records}
    if any(r is None or not r.fingerprint for r in records):
        # Runs trained before splits were fingerprinted can only be compared by the rest (seed and sizes).
        splits = {re.sub(r"; fingerprint [0-9a-f]+", "", s) for s in splits}
    if len(splits) > 1:
        print(
            f"warning: these runs were trained on {len(splits)} different splits ({' | '.join(sorted(splits))}); "
            "calibrating or scoring the result on any one of them includes images another member trained on",
            file=sys.stderr,
        )


def cmd_ensemble(args: argparse.Namespace) -> int:
    import torch

    from dermsight.posthoc.ensemble import combine

    out = _output_file(args.out, args.models)
    report = combine(args.models, out, dtype=None if args.float32 else torch.float16)
    _warn_if_splits_differ(args.models)
    for m in report["members"]:
        val = m["val"]
        figures = f"val balanced accuracy {val['balanced_accuracy']:.3f}, accuracy {val['accuracy']:.3f}" if val else ""
        print(f"  {m['model']} (seed {m['seed']}) {figures}")
    print(
        f"ensemble of {len(report['members'])} written to {report['model']} (weights stored as "
        f"{report['stored_as']}); now fit its temperature, gate and decision rule on the members' split:\n"
        f"  dermsight calibrate --model {args.out} --data RUN_FOLDER\n"
        f"  dermsight tune-decision --model {args.out} --data RUN_FOLDER"
    )
    return EXIT_OK


def cmd_model_card(args: argparse.Namespace) -> int:
    from dermsight.models.bundle import default_model_path, read_meta
    from dermsight.models.card import render_model_card

    path = Path(args.model) if args.model else default_model_path()
    notes = list(args.note)
    if args.notes:
        try:
            text = Path(args.notes).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--notes {args.notes}: cannot read it ({e.strerror or e})") from None
        # Paragraphs as written (blank lines between), without the file's own comments for whoever edits it.
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        notes += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    text = render_model_card(
        read_meta(path), model_file=args.name or path.name, reproduce=args.reproduce, notes=tuple(notes)
    )
    if args.out:
        out = _output_file(args.out, [path], writes="Markdown (.md)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"model card written to {args.out}")
    else:
        print(text)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from dermsight import __version__
    from dermsight.data.manifest import FORMATS

    p = argparse.ArgumentParser(
        prog="dermsight",
        description="Skin-lesion image classifier. An aid for people and dermatologists; not a medical device.",
    )
    p.add_argument("--version", action="version", version=f"dermsight {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="ingest datasets: manifest, split, cache, download")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    m = dsub.add_parser("manifest", help="read a dataset folder or CSV into a manifest, checking every image")
    m.add_argument("source", help="dataset folder or CSV (labels.csv, HAM10000, ISIC 2019, isic-cli, class folders)")
    m.add_argument("--out", required=True, help="manifest CSV to write (problems go beside it, *.problems.csv)")
    m.add_argument("--format", choices=FORMATS, help="dataset layout (default: detected)")
    m.add_argument("--quick", action="store_true", help="read image headers only (misses truncated files)")
    m.add_argument("--no-verify", action="store_true", help="do not open images at all")
    m.set_defaults(func=cmd_data_manifest)

    s = dsub.add_parser("split", help="add lesion-grouped train/val/test splits and CV folds to a manifest")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="manifest CSV with `split` and `fold` columns")
    s.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    s.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
    s.add_argument("--seed", type=_whole(0), default=0)
    s.add_argument("--folds", type=_whole(2), default=5, help="cross-validation folds over train+val (default 5)")
    s.add_argument("--label", default="label_ham7", help="column to stratify on (default label_ham7)")
    s.set_defaults(func=cmd_data_split)

    c = dsub.add_parser("cache", help="decode and resize every image once into a fast memory-mapped cache")
    c.add_argument("manifest")
    c.add_argument("--size", type=_whole(1), default=224, help="shorter side in pixels (never enlarged; default 224)")
    c.add_argument("--cache-dir", help="cache root (default $DERMSIGHT_CACHE or ~/.cache/dermsight)")
    c.add_argument("--workers", type=_whole(1), help="decoding threads (default: 2 per core, at most 8)")
    c.set_defaults(func=cmd_data_cache)

    d = dsub.add_parser("download", help="download ISIC Archive images with the official isic-cli")
    d.add_argument("--out", required=True, help="folder for images and metadata.csv")
    d.add_argument("--search", default="", help="ISIC Archive query, e.g. 'image_type:dermoscopic'")
    d.add_argument("--collections", default="", help="comma-separated collection ids (`isic collection list`)")
    d.add_argument("--limit", type=_whole(0), default=0, help="at most this many images (0: all matching)")
    d.add_argument("--dry-run", action="store_true", help="print the isic command without running it")
    d.set_defaults(func=cmd_data_download)
    t = sub.add_parser("train", help="train a model (config in YAML; see configs/)")
    t.add_argument("--config", help="YAML file of TrainConfig options (default: built-in defaults)")
    t.add_argument("--out", help="run folder (overrides the config)")
    t.add_argument("--epochs", type=_whole(1), help="override the number of epochs")
    t.add_argument("--seed", type=_whole(0), help="override the seed (runs of one recipe for `dermsight soup`)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the device")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config option, e.g. --set members=1 --set num_workers=4 (repeatable)",
    )
    t.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the manifest, split and decode-once cache, then stop (runs started afterwards share them)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a model on labelled data: metrics.json, plots, report.md")
    e.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    e.add_argument("--data", required=True, help="labelled data: a folder/CSV any reader understands, or a manifest")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--split", help="only this split of a split manifest (e.g. test)")
    e.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average over the 8 flips/rotations (default: the model's own rule)",
    )
    e.add_argument("--bootstrap", type=_whole(0), default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    e.add_argument(
        "--gates",
        action="store_true",
        help="also count the images the web app and predict would refuse (image quality, not a lesion); "
        "a second pass over the images. The metrics still cover every image",
    )
    e.set_defaults(func=cmd_evaluate)

    td = sub.add_parser(
        "tune-decision",
        help="choose TTA and the prior correction on the val split, refit the temperature, re-score val and test",
    )
    td.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    td.add_argument("--data", required=True, help="split manifest (split.csv) or a training run folder")
    td.add_argument("--out", help="write the tuned model here (default: in place)")
    td.add_argument("--reports", help="folder for the val/test reports (default: a temporary folder)")
    td.set_defaults(func=cmd_tune_decision)

    so = sub.add_parser(
        "soup", help="average the weights of runs of one recipe (greedy model soup, chosen on the val split)"
    )
    so.add_argument("models", nargs="+", metavar="MODEL", help="model files of runs of the same recipe")
    so.add_argument("--data", required=True, help="split manifest (split.csv) or a training run folder")
    so.add_argument("--out", required=True, help="model file to write")
    so.add_argument("--uniform", action="store_true", help="average all models (default: greedy on val)")
    so.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to score (default auto)")
    so.set_defaults(func=cmd_soup)

    en = sub.add_parser("ensemble", help="serve runs of one recipe as one model that averages their logits")
    en.add_argument("models", nargs="+", metavar="MODEL", help="model files of runs of the same recipe")
    en.add_argument("--out", required=True, help="model file to write")
    en.add_argument("--float32", action="store_true", help="store weights as float32 (default float16: half the size)")
    en.set_defaults(func=cmd_ensemble)

    mc = sub.add_parser("model-card", help="render a model's card (Markdown) from the metadata inside the model")
    mc.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    mc.add_argument("--out", help="write here instead of printing")
    mc.add_argument("--name", help="how to call the file in the card")
    mc.add_argument("--reproduce", default="", help="the command that reproduces the model")
    mc.add_argument("--note", action="append", default=[], help="a paragraph to add (repeatable)")
    mc.add_argument("--notes", help="a Markdown file of paragraphs to add after --note's (HTML comments left out)")
    mc.set_defaults(func=cmd_model_card)

    def inference_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--backend",
            choices=BACKENDS,
            default="auto",
            help="ONNX Runtime, PyTorch, or auto: ONNX Runtime with PyTorch as the fallback (default)",
        )
        sp.add_argument(
            "--threads", type=_whole(1), help="intra-op threads (default: $DERMSIGHT_THREADS, else all cores)"
        )

    pr = sub.add_parser("predict", help="classify lesion images (rejects images it cannot assess)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, TIFF)")
    pr.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    pr.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average over the 8 flips/rotations (default: the model's own rule)",
    )
    pr.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay per image to DIR/<name>_gradcam.png")
    pr.add_argument("--json", action="store_true", help="print a JSON array, one object per image")
    inference_options(pr)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check it against PyTorch")
    ex.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    ex.add_argument("--out", required=True, metavar="FILE.onnx", help="ONNX file to write")
    ex.add_argument("--int8", action="store_true", help="also write FILE.int8.onnx (dynamic int8) and compare it")
    ex.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images, folders or a split manifest (its val split, with labels) for the parity check "
        "(default: synthetic images)",
    )
    ex.add_argument("--max-check", type=_whole(1), default=64, help="at most this many check images (default 64)")
    ex.add_argument("--threads", type=_whole(1), help="ONNX Runtime threads for the check (default 1)")
    ex.set_defaults(func=cmd_export)

    ca = sub.add_parser("calibrate", help="fit temperature scaling and the not-a-lesion gate on a validation split")
    ca.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    ca.add_argument(
        "--data",
        required=True,
        metavar="SPLIT_MANIFEST_OR_RUN_DIR",
        help="split manifest (train: fits the OOD statistics, val: temperature and threshold, test: "
        "measured only) or a training run folder with split.csv",
    )
    ca.add_argument("--out", help="model file to write (default: update --model in place)")
    ca.add_argument(
        "--negatives",
        nargs="+",
        metavar="PATH",
        help="images or folders of non-lesion photos, to measure the share the gate catches",
    )
    ca.add_argument(
        "--target-rejection",
        type=_share,
        default=0.01,
        help="share of validation lesions the OOD threshold may reject (default 0.01: held-out lesions were "
        "rejected about twice as often as validation ones, and the bar is 5%%)",
    )
    ca.add_argument(
        "--max-fit-images",
        type=_whole(1),
        default=4000,
        help="training images used to fit the OOD statistics (default 4000)",
    )
    inference_options(ca)
    ca.set_defaults(func=cmd_calibrate)

    w = sub.add_parser("serve", help="run the web app and JSON API (gunicorn)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=_whole(0, 65535), default=8000, help="port (default 8000)")
    w.add_argument("--model", help="model file (default: $DERMSIGHT_MODEL, else the bundled default model)")
    w.add_argument("--workers", type=_whole(1), help="worker processes (default: CPU cores, at most 4)")
    w.add_argument("--dev", action="store_true", help="Flask's development server, one process (not for production)")
    w.set_defaults(func=cmd_serve)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from dermsight.data.download import DownloadError
    from dermsight.data.images import ImageError
    from dermsight.data.problems import DataError
    from dermsight.domain.classes import UnknownLabelError
    from dermsight.models.bundle import ModelLoadError
    from dermsight.models.factory import WeightsError

    return (
        DataError,
        ImageError,
        UnknownLabelError,
        DownloadError,
        ModelLoadError,
        WeightsError,
        FileNotFoundError,
        ValueError,
    )


_DISK_FULL_OR_READ_ONLY = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large",
}


def _disk_error(e: BaseException | None) -> OSError | None:
    """The full disk or read-only file system behind ``e``, or None. Export wraps the OSError in its own error, and
    safetensors reports it only in words, so the cause chain and the message are both read."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_OR_READ_ONLY:
            return e
        for number, words in _DISK_FULL_OR_READ_ONLY.items():
            if words in str(e):
                return OSError(number, words)
        e = e.__cause__ or e.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # A path the user gave cannot be written or read as asked: an output folder where a file stands, say.
        where = f": {e.filename}" if e.filename else ""
        print(f"error: cannot use that path ({e.strerror or e}){where}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        hint = ""
        if func is cmd_train and not getattr(args, "prepare_only", False):
            hint = " (training keeps its last finished epoch: run the same command with --resume to continue)"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        disk = _disk_error(e)
        if disk is not None:
            # The machine's state, not a bug: say what and where.
            where = f": {disk.filename}" if disk.filename else ""
            print(f"error: cannot write ({disk.strerror}){where}", file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("DERMSIGHT_DEBUG"):
            raise
        print(
            f"internal error: {type(e).__name__}: {e}\n(this is a bug; set DERMSIGHT_DEBUG=1 for the traceback "
            "and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
