#!/usr/bin/env bash
# Runs of one recipe that differ only in their seed, then one model from them: a greedy model soup (`dermsight soup`:
# weights averaged where that helps on the val split) or an ensemble (`dermsight ensemble`: logits averaged), and on
# it the temperature, not-a-lesion gate and decision rule, all fitted on train/val. The test split is scored for the
# record and used for no choice.
#
#   bash scripts/train_seeds.sh        # configs/gpu.yaml, seeds 0 1 2 side by side on one CUDA GPU (runs/seed*/)
#   CONFIG=configs/ham4.yaml SEEDS="0 1" DEVICE=cpu PARALLEL=0 bash scripts/train_seeds.sh   # CPU, one by one
#   CONFIG=configs/ham4.yaml SEEDS="4 5 6 7" EPOCHS=24 WORKERS=4 COMBINE=ensemble bash scripts/train_seeds.sh
#
# Knobs (environment): SEEDS, CONFIG, RUNS (output folder, default runs), DEVICE (cuda|cpu), PARALLEL (1: the runs
# share the device; 0: one after another), EPOCHS, WORKERS (data loader processes per run), AUGMENT (loader|device:
# where training images are augmented; device frees the CPU cores for more runs side by side), COMBINE (soup|ensemble),
# DEADLINE_S (each run's time budget ends 90 s before it, so the run stops between epochs and scores its best
# checkpoint so far; a run still going at the deadline is stopped, keeping its best checkpoint), CALIBRATE (0: stop after
# combining), MAX_STEPS_PER_EPOCH (dry runs), PYTHON.
set -uo pipefail
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs}
CONFIG=${CONFIG:-configs/gpu.yaml}
DEVICE=${DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-0}
CALIBRATE=${CALIBRATE:-1}
PARALLEL=${PARALLEL:-1}
COMBINE=${COMBINE:-soup}
case "$COMBINE" in soup|ensemble) ;; *) echo "COMBINE must be soup or ensemble, got $COMBINE"; exit 2;; esac
# The project's .venv when there is one (what `make app` / `make test` install into), else the python3 on PATH.
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS"

# Every run reads the shared config; only the seed, the run folder and the knobs below differ (`dermsight train --set`).
# members=1: each seed is one model even when the config describes an ensemble of them.
opts=(--set members=1 --set "member_overrides=[]" --set calibrate=false --set tune_decision=false --device "$DEVICE")
[ -n "${EPOCHS:-}" ] && opts+=(--epochs "$EPOCHS")
[ -n "${WORKERS:-}" ] && opts+=(--set "num_workers=$WORKERS")
[ -n "${AUGMENT:-}" ] && opts+=(--set "augment=$AUGMENT")
# A deadline also becomes each run's time budget, a margin before it (start-up, the final scoring), so a run stops
# in time and still scores its best checkpoint; `timeout` below only backs it up.
[ "$DEADLINE_S" -gt 0 ] && opts+=(--set "time_limit_s=$(( DEADLINE_S > 180 ? DEADLINE_S - 90 : DEADLINE_S / 2 ))")
[ -n "${MAX_STEPS_PER_EPOCH:-}" ] && opts+=(--set "max_steps_per_epoch=$MAX_STEPS_PER_EPOCH")

# Manifest, split and decode-once cache built once, before the runs start (they then all reuse it).
"$PY" -m dermsight.cli train --config "$CONFIG" "${opts[@]}" --prepare-only || exit 1

pids=()
for s in $SEEDS; do
  if [ "$DEADLINE_S" -gt 0 ]; then lim=(timeout --signal=INT --kill-after=30 "$DEADLINE_S"); else lim=(); fi
  "${lim[@]}" "$PY" -m dermsight.cli train --config "$CONFIG" "${opts[@]}" --seed "$s" --out "$RUNS/seed$s" \
    >"$RUNS/seed$s.log" 2>&1 &
  pids+=($!)
  if [ "$PARALLEL" != 1 ]; then wait "$!" || echo "run $s ended early (exit $?): see $RUNS/seed$s.log"; fi
done
if [ "$PARALLEL" = 1 ]; then
  for p in "${pids[@]}"; do wait "$p" || echo "a run ended early (exit $?): see $RUNS/seed*.log"; done
fi
grep -h "val balanced acc" "$RUNS"/seed*.log | tail -n 6

# Each run's model.safetensors (or best.safetensors when a deadline cut it short) is combined.
models=()
for s in $SEEDS; do
  if [ -f "$RUNS/seed$s/model.safetensors" ]; then models+=("$RUNS/seed$s/model.safetensors")
  elif [ -f "$RUNS/seed$s/best.safetensors" ]; then models+=("$RUNS/seed$s/best.safetensors"); fi
done
first=${SEEDS%% *}
if [ "${#models[@]}" -lt 2 ]; then echo "fewer than two finished runs: nothing to combine"; exit 1; fi
if [ "$COMBINE" = ensemble ]; then
  "$PY" -m dermsight.cli ensemble "${models[@]}" --out "$RUNS/$COMBINE.safetensors" || exit 1
else
  "$PY" -m dermsight.cli soup "${models[@]}" --data "$RUNS/seed$first" --out "$RUNS/$COMBINE.safetensors" \
    --device "$DEVICE" || exit 1
fi
if [ "$CALIBRATE" = 1 ]; then
  "$PY" -m dermsight.cli calibrate --model "$RUNS/$COMBINE.safetensors" --data "$RUNS/seed$first" || exit 1
  "$PY" -m dermsight.cli tune-decision --model "$RUNS/$COMBINE.safetensors" --data "$RUNS/seed$first" \
    --reports "$RUNS/${COMBINE}_reports" || exit 1
fi
