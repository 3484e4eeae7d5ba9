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

echo "== 6. Logit lens on next_day (tuned lens too, if one is cached: make lens) =="
$R lens logit --prompt "Today it is Monday so tomorrow it is" --target " Tuesday" --out "$OUT/lens-prompt"
$R lens tuned --prompt "Today it is Monday so tomorrow it is" --target " Tuesday" --out "$OUT/tuned-prompt" \
  || echo "(no tuned lens cached: run 'make lens', about 3 CPU minutes)"

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

echo "== 8. W3: is the artist-vs-scientist direction causally sufficient? (layer 15, name token) =="
W3="$OUT/w3"
run_once "$W3/direction_L15" $R features patch --direction "$OUT/superset_known" --class artist-scientist \
  --layer 15 --task superclass --classes artist,scientist --random 100
echo "-- SAE decomposition and latent patching (needs the cached layer-15 SAE: make sae) --"
if run_once "$W3/decompose" $R sae decompose --direction "$W3/direction_L15/direction.json" \
     --store "$OUT/superset_known" --label superclass --class artist; then
  run_once "$W3/latents" $R sae patch --layer 15 --from "$W3/decompose" --top 5 \
    --task superclass --classes artist,scientist
else
  echo "(no layer-15 SAE cached: run 'make sae', about 11 CPU minutes, 20 minutes wall)"
fi
