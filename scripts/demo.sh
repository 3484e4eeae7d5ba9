#!/usr/bin/env bash
# The demo behind `make demo`: the main job on the embedded SmolLM2 model.
# Idempotent: dataset checks are cached per (model, dataset, scoring) and a
# finished store is not recomputed.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/replab
OUT=${REPLAB_DEMO_DIR:-runs/demo}
mkdir -p "$OUT"

echo "== 1. Does the model know the builtin prompt sets? =="
$R datasets check all

echo "== 2. Keep the superset items the model knows =="
$R datasets check superset --known-only --out "$OUT/superset_known.jsonl"

echo "== 3. Harvest the residual stream at each person's last name token, all 30 layers =="
$R harvest --dataset "$OUT/superset_known.jsonl" --hooks resid_post --layers all \
  --positions entity_last --out "$OUT/superset_known"
$R store info "$OUT/superset_known"

echo "== 4. Probe the super-class at every layer (controls, held-out templates, LEACE) =="
if [ ! -f "$OUT/probe_superclass/summary.json" ]; then
  $R probe train --store "$OUT/superset_known" --label superclass --out "$OUT/probe_superclass"
else
  echo "(cached: $OUT/probe_superclass; delete it to rerun)"
fi

echo "== 5. Sequence types: PCA at the last shown item (\"3\" vs \"three\") at every layer =="
$R harvest --dataset sequence_types --hooks resid_post --layers all --positions last_item_last \
  --out "$OUT/sequence_types"
$R plot pca --store "$OUT/sequence_types" --color seq_type --out "$OUT/geometry"

echo "== 6. Logit and tuned lens on next_day (the tuned lens is trained once and cached: 3-6 min the first time) =="
$R lens logit --prompt "Today it is Monday so tomorrow it is" --target " Tuesday" --out "$OUT/lens-prompt"
OMP_NUM_THREADS=1 nice -n 10 $R lens train
$R lens tuned --prompt "Today it is Monday so tomorrow it is" --target " Tuesday" --out "$OUT/tuned-prompt"

echo "== 7. W2 on next_day: test prompt, baseline, DLA (+ its top heads), patching grid, head patterns, AtP =="
W2="$OUT/w2"
run_once() {  # run_once DIR CMD...: skip a step whose run directory is complete
  local dir=$1; shift
  if [ -f "$dir/summary.json" ]; then echo "(cached: $dir)"; else "$@" --out "$dir"; fi
}
$R test-prompt "Today it is Monday so tomorrow it is" " Tuesday" --top-k 5
run_once "$W2/baseline" $R patch baseline --task next_day
run_once "$W2/dla" $R attribute dla --task next_day
run_once "$W2/dla_patterns" $R patch patterns --task next_day --from "$W2/dla" --top 3
run_once "$W2/grid" $R patch grid --task next_day
run_once "$W2/patterns" $R patch patterns --task next_day --from "$W2/grid" --top 9
run_once "$W2/atp" $R attribute atp --task next_day --top 20

echo "== 8. W3: where is the artist probe's direction used, and is it causally sufficient there? =="
# Every step is cached: a finished run directory (summary.json / eval.json) is not recomputed,
# and `sae train` reuses an SAE trained with the same config. Delete $OUT/w3 to rerun.
W3="$OUT/w3"
PY=.venv/bin/python
TASK=(--task superclass --classes artist,scientist --dataset "$OUT/superset_known.jsonl")
echo "-- scan: per layer, the full-residual patch at the name, the probe direction's patch, probe accuracy --"
run_once "$W3/scan" $R features scan --probe "$OUT/probe_superclass" --class artist "${TASK[@]}"
L=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["chosen_layer"])' "$W3/scan/summary.json")
if [ "$L" = "None" ]; then
  echo "(the scan chose no layer: see $W3/scan/summary.json; skipping the rest of W3)"
  exit 0
fi
echo "-- the probe's own artist Direction at layer $L (the scan's choice): patching verdict with baselines --"
run_once "$W3/direction_L$L" $R features patch --direction "$OUT/probe_superclass" --class artist \
  --layer "$W3/scan" "${TASK[@]}" --random 100
echo "-- an SAE on layer $L (trained once and cached: about 11 CPU-min: 15 min wall on a quiet 2-core machine, 30 on a busy one) --"
OMP_NUM_THREADS=1 nice -n 10 $R sae train --layer "$L" --threads 1
# (reused while the SAE weights and held-out text are unchanged; --sae-lens: SAELens run_evals on the same tokens)
$R sae eval --layer "$L" --sae-lens 1024 --out "$W3/sae_eval_L$L"
echo "-- its top latents for the artist class, then latent patching --"
run_once "$W3/decompose_L$L" $R sae decompose --direction "$W3/direction_L$L/direction.json" \
  --store "$OUT/superset_known" --label superclass --class artist
run_once "$W3/latents_L$L" $R sae patch --layer "$L" --from "$W3/decompose_L$L" --top 5 "${TASK[@]}"
