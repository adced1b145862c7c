#!/usr/bin/env bash
# Reproduces the bundled default model on one CUDA GPU (it was made this way on a lent H100):
#   1. three runs of configs/gpu.yaml that differ only in their seed, trained side by side on the one GPU;
#   2. a greedy model soup of them (`dermsight soup`): their weights averaged where that helps on the val split;
#   3. temperature, not-a-lesion gate and decision rule fitted on train/val (`calibrate`, `tune-decision`).
# The test split is scored for the record at the end and used for no choice.
#
#   bash scripts/train_default.sh                 # writes runs/gpu_s{0,1,2}/ and runs/soup.safetensors
#   SEEDS="0 1" RUNS=/tmp/runs bash scripts/train_default.sh
# Knobs (environment): SEEDS, RUNS (output folder), CONFIG, DEVICE (cuda|cpu), EPOCHS, DEADLINE_S (stop the runs
# after this many seconds; each keeps its best checkpoint so far), CALIBRATE=0 (stop after the soup).
set -uo pipefail
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs}
CONFIG=${CONFIG:-configs/gpu.yaml}
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-0}
CALIBRATE=${CALIBRATE:-1}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

# One config per seed, written from the shared one (only seed and out differ; EPOCHS/MAX_STEPS for dry runs).
for s in $SEEDS; do
  "$PY" - "$CONFIG" "$RUNS/gpu_s$s" "$s" "$RUNS/gpu_s$s.yaml" <<'PYEOF' || exit 1
import os, sys
from dermsight.training import TrainConfig
config, out, seed, dest = sys.argv[1:]
extra = {k.lower(): int(os.environ[k]) for k in ("EPOCHS", "MAX_STEPS_PER_EPOCH") if os.environ.get(k)}
cfg = TrainConfig.from_yaml(config, out=out, seed=int(seed), device=os.environ.get("DEVICE", "cuda"),
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
" "$RUNS/gpu_s${SEEDS%% *}.yaml" || exit 1

pids=()
for s in $SEEDS; do
  if [ "$DEADLINE_S" -gt 0 ]; then lim=(timeout --signal=INT --kill-after=30 "$DEADLINE_S"); else lim=(); fi
  "${lim[@]}" "$PY" -m dermsight.cli train --config "$RUNS/gpu_s$s.yaml" >"$RUNS/gpu_s$s.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "a run ended early (exit $?): see $RUNS/gpu_s*.log"; done
grep -h "val balanced acc" "$RUNS"/gpu_s*.log | tail -n 6

# Each run's model.safetensors (or best.safetensors when a deadline cut it short) goes into the soup.
models=()
for s in $SEEDS; do
  if [ -f "$RUNS/gpu_s$s/model.safetensors" ]; then models+=("$RUNS/gpu_s$s/model.safetensors")
  elif [ -f "$RUNS/gpu_s$s/best.safetensors" ]; then models+=("$RUNS/gpu_s$s/best.safetensors"); fi
done
first=${SEEDS%% *}
if [ "${#models[@]}" -ge 2 ]; then
  "$PY" -m dermsight.cli soup "${models[@]}" --data "$RUNS/gpu_s$first" --out "$RUNS/soup.safetensors" \
    --device "$DEVICE" || exit 1
else
  echo "fewer than two finished runs: no soup"; exit 1
fi
if [ "$CALIBRATE" = 1 ]; then
  "$PY" -m dermsight.cli calibrate --model "$RUNS/soup.safetensors" --data "$RUNS/gpu_s$first" || exit 1
  "$PY" -m dermsight.cli tune-decision --model "$RUNS/soup.safetensors" --data "$RUNS/gpu_s$first" \
    --reports "$RUNS/soup_reports" || exit 1
fi
