#!/usr/bin/env bash
# The demo behind `make demo`: the W3 workflow as one command on the embedded SmolLM2 model,
#   replab run superset --out runs/demo/superset
# (known-item filter -> harvest -> probe sweep -> feature scan -> block sweeps -> hydra -> path
# patching -> generalisation grid -> rank -> direction patching -> SAE (trained once, cached) ->
# SAE decomposition -> latent patching), then prints where the report is.
#
# Idempotent: every stage of a run is cached by the model identity and its options, the SAE by
# its training config (under $REPLAB_CACHE, default ~/.cache/replab), so a second `make demo`
# reuses everything. More experiments: REPLAB_DEMO_EXPERIMENTS="superset next-day" make demo.
# The time it takes, and the command that measures it, are in the README ("Demo").
set -euo pipefail
cd "$(dirname "$0")/.."
R=${REPLAB:-.venv/bin/replab}
OUT=${REPLAB_DEMO_DIR:-runs/demo}
EXPERIMENTS=${REPLAB_DEMO_EXPERIMENTS:-superset}
mkdir -p "$OUT"

for name in $EXPERIMENTS; do
  echo "== replab run $name =="
  nice -n 10 $R run "$name" --out "$OUT/$name"
done
echo
for name in $EXPERIMENTS; do
  echo "report: $OUT/$name/report.html"
done
