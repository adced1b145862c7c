#!/usr/bin/env bash
# Runs of one recipe that differ only in their seed, then a greedy model soup of them (`dermsight soup`: weights
# averaged where that helps on the val split) and, on the soup, the temperature, not-a-lesion gate and decision rule,
# all fitted on train/val. The test split is scored for the record and used for no choice.
#
#   bash scripts/train_seeds.sh        # configs/gpu.yaml, seeds 0 1 2 side by side on one CUDA GPU (runs/seed*/)
#   CONFIG=configs/default.yaml SEEDS="0 1" DEVICE=cpu PARALLEL=0 bash scripts/train_seeds.sh   # CPU, one by one
#
# Knobs (environment): SEEDS, CONFIG, RUNS (output folder, default runs), DEVICE (cuda|cpu), PARALLEL (1: the runs
# share the device; 0: one after another), EPOCHS, DEADLINE_S (stop each run after this many seconds, keeping its best
# checkpoint so far), CALIBRATE (0: stop after the soup), PYTHON.
set -uo pipefail
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs}
CONFIG=${CONFIG:-configs/gpu.yaml}
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-0}
CALIBRATE=${CALIBRATE:-1}
PARALLEL=${PARALLEL:-1}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

# One config per seed, written from the shared one (only seed and out differ; EPOCHS/MAX_STEPS for dry runs).
for s in $SEEDS; do
  "$PY" - "$CONFIG" "$RUNS/seed$s" "$s" "$RUNS/seed$s.yaml" <<'PYEOF' || exit 1
import os, sys
from dermsight.training import TrainConfig
config, out, seed, dest = sys.argv[1:]
extra = {k.lower(): int(os.environ[k]) for k in ("EPOCHS", "MAX_STEPS_PER_EPOCH") if os.environ.get(k)}
cfg = TrainConfig.from_yaml(config, out=out, seed=int(seed), members=1, device=os.environ.get("DEVICE", "cuda"),
                            calibrate=False, tune_decision=False, **extra)
cfg.to_yaml(__import__("pathlib").Path(dest))
PYEOF
done

# Manifest, split and decode-once cache built once, before the runs start (they then all reuse it).
"$PY" -c "
import sys
from dermsight.training import TrainConfig
from dermsight.training.loop import prepare_data
d = prepare_data(TrainConfig.from_yaml(sys.argv[1]))
print(f'{len(d.manifest)} images ready in the cache')
" "$RUNS/seed${SEEDS%% *}.yaml" || exit 1

pids=()
for s in $SEEDS; do
  if [ "$DEADLINE_S" -gt 0 ]; then lim=(timeout --signal=INT --kill-after=30 "$DEADLINE_S"); else lim=(); fi
  "${lim[@]}" "$PY" -m dermsight.cli train --config "$RUNS/seed$s.yaml" >"$RUNS/seed$s.log" 2>&1 &
  pids+=($!)
  if [ "$PARALLEL" != 1 ]; then wait "$!" || echo "run $s ended early (exit $?): see $RUNS/seed$s.log"; fi
done
if [ "$PARALLEL" = 1 ]; then
  for p in "${pids[@]}"; do wait "$p" || echo "a run ended early (exit $?): see $RUNS/seed*.log"; done
fi
grep -h "val balanced acc" "$RUNS"/seed*.log | tail -n 6

# Each run's model.safetensors (or best.safetensors when a deadline cut it short) goes into the soup.
models=()
for s in $SEEDS; do
  if [ -f "$RUNS/seed$s/model.safetensors" ]; then models+=("$RUNS/seed$s/model.safetensors")
  elif [ -f "$RUNS/seed$s/best.safetensors" ]; then models+=("$RUNS/seed$s/best.safetensors"); fi
done
first=${SEEDS%% *}
if [ "${#models[@]}" -ge 2 ]; then
  "$PY" -m dermsight.cli soup "${models[@]}" --data "$RUNS/seed$first" --out "$RUNS/soup.safetensors" \
    --device "$DEVICE" || exit 1
else
  echo "fewer than two finished runs: no soup"; exit 1
fi
if [ "$CALIBRATE" = 1 ]; then
  "$PY" -m dermsight.cli calibrate --model "$RUNS/soup.safetensors" --data "$RUNS/seed$first" || exit 1
  "$PY" -m dermsight.cli tune-decision --model "$RUNS/soup.safetensors" --data "$RUNS/seed$first" \
    --reports "$RUNS/soup_reports" || exit 1
fi
