"""`dermsight train`: a model from a YAML config, with the named flags and `--set KEY=VALUE` as overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermsight.cli.common import EXIT_OK, whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model (config in YAML; see configs/)")
    t.add_argument("--config", help="YAML file of TrainConfig options (default: built-in defaults)")
    t.add_argument("--out", help="run folder (overrides the config)")
    t.add_argument("--epochs", type=whole(1), help="override the number of epochs")
    t.add_argument("--seed", type=whole(0), help="override the seed (runs of one recipe for `dermsight soup`)")
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


def cmd_train(args: argparse.Namespace) -> int:
    from dermsight.training import TrainConfig, prepare_data, train

    overrides = dict(TrainConfig.parse_override(pair) for pair in args.set)
    # The named flags win over --set: they are the documented, specific form.
    named = {"out": args.out, "epochs": args.epochs, "seed": args.seed, "device": args.device}
    overrides |= {k: v for k, v in named.items() if v is not None} | ({"resume": True} if args.resume else {})
    cfg = TrainConfig.from_yaml(Path(args.config), **overrides) if args.config else TrainConfig(**overrides)
    if args.prepare_only:
        data = prepare_data(cfg)
        counts = data.manifest["split"].value_counts()
        print(
            f"{len(data.manifest)} images ready in the cache {data.cache.folder} "
            f"({', '.join(f'{s} {counts.get(s, 0)}' for s in ('train', 'val', 'test'))})"
        )
        return EXIT_OK
    train(cfg)
    return EXIT_OK
