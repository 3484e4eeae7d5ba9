#!/usr/bin/env bash
# The circuit acceptance runs on the default model (SmolLM2-135M-Instruct), as reported in
# docs/circuits.md. Each step is one `replab circuit ...` command writing a replayable run
# directory under $OUT (default runs/circuits). Slow on a CPU (hours): run it once, with nice.
#   bash scripts/circuits_acceptance.sh            # everything
#   STEPS="seq" bash scripts/circuits_acceptance.sh  # one part: seq | seqval | nextday | grid | compare | edges
# seq prunes on the first 8 prompts of the sequence task, then validates the greedy 0.8
# circuit on those 8 prompts (seq8-*) and on all 26 (seq-*, the same circuit on new prompts);
# seqval repeats only the validation; edges discovers edge circuits on next_day and on the
# sequence task (docs/edges.md; skipped when already there) and compares them with the pruning
# circuits of the nextday and seq steps (scripts/edges_vs_pruning.py).
set -euo pipefail
OUT=${OUT:-runs/circuits}
PY=${PY:-python}
R="$PY -m replab circuit"
STEPS=${STEPS:-"seq nextday grid compare edges"}     # edges needs seq and nextday first
mkdir -p "$OUT"

pick_circuit() {  # $1 prune run dir, $2 order, $3 threshold -> writes $1/circuit_<order>_<threshold>.json
  $PY - "$1" "$2" "$3" <<'PYEOF'
import json, sys
d, order, th = sys.argv[1], sys.argv[2], float(sys.argv[3])
lv = [x for x in json.load(open(f"{d}/summary.json"))["levels"] if x["order"] == order and x["threshold"] == th][0]
path = f"{d}/circuit_{order}_{th:g}.json"
json.dump({"components": lv["heads"], "performance": lv["performance"]}, open(path, "w"))
print(path)
PYEOF
}

top_member() {  # $1 minimality run dir -> the member whose removal costs the set most
  $PY -c "import json,sys; r=json.load(open(sys.argv[1]+'/summary.json'))['records']; \
print(max(r, key=lambda x: x['delta'])['components'][0])" "$1"
}

validate() {  # $1 name, $2 task args, $3 circuit file
  local name=$1 args=$2 circuit=$3
  $R necessity   $args --components "$circuit" --out "$OUT/$name-necessity"
  $R sufficiency $args --components "$circuit" --out "$OUT/$name-sufficiency"
  $R minimality  $args --components "$circuit" --out "$OUT/$name-minimality"
  $R hydra       $args --ablate "$(top_member "$OUT/$name-minimality")" --out "$OUT/$name-hydra"
}

validate_seq() {  # the greedy 0.8 circuit of seq-prune on its 8 prompts and on all of them
  validate seq8 "--task sequences --limit 8" "$(pick_circuit "$OUT/seq-prune" greedy 0.8)"
  validate seq "--task sequences" "$(pick_circuit "$OUT/seq-prune" greedy 0.8)"
}

discover() {  # $1 run dir, then the task args: edge circuits by every method, unless already there
  local dir=$1; shift
  [ -f "$dir/summary.json" ] || $R discover "$@" --method eap,eap-ig,'atp*' --out "$dir"
}

for step in $STEPS; do
  case $step in
    seq)
      $R prune --task sequences --limit 8 --orders greedy,attribution,reverse,random:3 --candidates 16 \
               --check-every 50 --out "$OUT/seq-prune"
      validate_seq
      ;;
    seqval)
      validate_seq
      ;;
    edges)
      discover "$OUT/discover-next_day" --task next_day --rule riemann \
               --edges 50,100,200,500,1000,2000,5000,10000,20000
      discover "$OUT/discover-sequences" --task sequences --limit 8 --edges 50,100,200,500,1000,2000,5000
      $PY scripts/edges_vs_pruning.py "$OUT/discover-next_day" "$OUT/nextday-prune" \
          --json "$OUT/nextday-edges-vs-prune.json"
      $PY scripts/edges_vs_pruning.py "$OUT/discover-sequences" "$OUT/seq-prune" --json "$OUT/seq-edges-vs-prune.json"
      ;;
    nextday)
      $R prune --task next_day --orders greedy,attribution,reverse,random:3 --candidates 16 \
               --check-every 50 --out "$OUT/nextday-prune"
      validate nextday "--task next_day" "$(pick_circuit "$OUT/nextday-prune" greedy 0.8)"
      ;;
    grid)
      $R grid --task superclass --classes artist,athlete,scientist,politician,writer --layer 20 \
              --pairs 8 --out "$OUT/superclass-grid-L20"
      $R grid --task superclass --classes artist,athlete,scientist,politician,writer --layer 20 \
              --pairs 8 --positions entity_last --out "$OUT/superclass-grid-L20-entity"
      ;;
    compare)
      $R compare "$OUT/seq-prune" "$OUT/nextday-prune" --out "$OUT/compare-seq-nextday"
      ;;
  esac
done
echo "done: $OUT"
