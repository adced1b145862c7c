"""Training throughput: the loader path (per-image augmentation in DataLoader workers) against the device path
(`augment: device`, per-batch augmentation next to the model), measured in one run on the same model, data and
machine, so the ratio is meaningful on a shared, noisy machine.

    .venv/bin/python bench/train_speed.py                                  # CPU, configs/default.yaml
    python bench/train_speed.py --device cuda --workers 0 4 8 --out bench/train_speed_gpu.md

For each path: images/s of full training steps (augmentation, forward, backward, optimiser step) after a warm-up,
and images/s of the data path alone (batches produced, no model), both as the median of ``--repeats`` timings. The
ratio column compares each row's training throughput with the first row's (the loader path at the first worker
count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from dermsight.models.factory import create_model
from dermsight.models.meta import ModelMeta
from dermsight.training import TrainConfig
from dermsight.training.data import CachedImages, DeviceBatches, prepare_data, subset, train_augmentation
from dermsight.training.engine import WeightedCrossEntropy, autocast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(batches, steps: int, device: torch.device, step_fn=None) -> float:
    """Seconds for ``steps`` batches of ``batches`` (an iterable restarted as needed), each passed to ``step_fn``.

    The first batches are not timed: worker start, cuDNN autotuning, allocator growth, and the batches loader
    workers prefetched (``prefetch_factor`` per worker) before the timer could start, which would otherwise count as
    free."""
    workers = getattr(batches, "num_workers", 0)
    warm = 2 + (batches.prefetch_factor or 0) * workers if workers else 2
    done, t0 = 0, 0.0
    while True:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if step_fn is not None:
                step_fn(x, y)
            done += 1
            if done == warm:  # the timer covers the next `steps` batches: each fetched and stepped
                sync(device)
                t0 = time.perf_counter()
            elif done == warm + steps:
                sync(device)
                return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="loader worker counts to measure")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="0: the config's")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args()

    cfg = TrainConfig.from_yaml(args.config, members=1, member_overrides=[])  # the recipe, one network
    device = torch.device(args.device)
    bs = args.batch_size or cfg.batch_size
    data = prepare_data(cfg, progress=False)
    train_df = subset(data, "train")
    rows, targets = train_df["cache_row"].to_numpy(), train_df["target"].to_numpy()

    model, winfo = create_model(cfg.arch, len(data.classes), weights="none", drop_rate=cfg.drop_rate)
    meta = ModelMeta.new(cfg.arch, cfg.taxonomy, winfo, input_size=cfg.input_size, config=cfg.model_dump(mode="json"))
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = WeightedCrossEntropy(None, cfg.label_smoothing).to(device)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sampler = RandomSampler(range(len(rows)), generator=torch.Generator().manual_seed(0))
    paths: list[tuple[str, object]] = []
    preset = train_augmentation(cfg, meta)
    for w in args.workers:
        ds = CachedImages(data.cache, rows, targets, preset)
        dl = DataLoader(
            ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=w, persistent_workers=w > 0,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        paths.append((f"loader, {w} worker(s)", dl))
    aug = train_augmentation(cfg, meta, batched=True)
    paths.append(("device (augment: device)", DeviceBatches(data.cache, rows, targets, sampler, bs, aug, device, True)))

    table = []
    for name, batches in paths:
        train_s = statistics.median(timed_steps(batches, args.steps, device, train_step) for _ in range(args.repeats))
        data_s = statistics.median(timed_steps(batches, args.steps, device) for _ in range(args.repeats))
        table.append((name, args.steps * bs / train_s, args.steps * bs / data_s))
        print(f"{name}: training {table[-1][1]:.0f} images/s, data path alone {table[-1][2]:.0f} images/s", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Training throughput, {cfg.arch} at {cfg.input_size} px, batch {bs}, {name}; "
        f"{args.steps} timed steps, median of {args.repeats}; ratios against the first row, same run.",
        "",
        "| data path | training (images/s) | ratio | data path alone (images/s) |",
        "|---|---:|---:|---:|",
    ]
    for n, t, d in table:
        lines.append(f"| {n} | {t:.0f} | {t / table[0][1]:.2f} | {d:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
