#!/bin/bash
# Same results before and after a refactor: run one set of commands on the `ref` model in two checkouts
# (each with its own code, one Python) and compare what they write.
#
#   bash scripts/same_results.sh OLD_TREE NEW_TREE [PYTHON]
#
# Compares the sha256 of every .safetensors/.onnx/.bin/.npy written and every --json report (paths and
# seconds left out). Exit 0 when all agree; the differences are printed otherwise. Takes ~3 min on 2 cores.
set -u
OLD=$(realpath "$1"); NEW=$(realpath "$2")
PY=$(command -v "${3:-python}"); PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, venv kept
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT

run_all() {  # TREE OUT
  local T=$1 O=$2; mkdir -p "$O"; cd "$T" || exit 2
  local M="env PYTHONPATH=$T $PY -m mimc"
  failed() { echo "$1 failed in $T" | tee -a "$O/FAILED"; }
  $M run examples/ref-cpu.yaml -o "$O/cpu" > /dev/null 2>&1 || failed "run ref-cpu"
  $M run examples/ref-openvino.yaml -o "$O/ov" > /dev/null 2>&1 || failed "run ref-openvino"
  $M prune ref --ratio 0.5 -o "$O/prune" --json > "$O/prune.json" 2>/dev/null || failed "prune"
  $M tokens ref --method tome --r 8 -o "$O/tome" --json > "$O/tome.json" 2>/dev/null || failed "tokens"
  $M width ref --mlp 0.25 --heads 0.25 --criterion activation --data builtin --n 16 -o "$O/width" --json \
    > "$O/width.json" 2>/dev/null || failed "width"
  $M width ref --macs 0.6 -o "$O/macs" --json > "$O/macs.json" 2>/dev/null || failed "width --macs"
  $M sparsify ref --pattern 2:4 --method wanda --calib builtin -o "$O/nm" --json > "$O/nm.json" 2>/dev/null \
    || failed "sparsify"
  $M export "$O/prune" --json > "$O/export.json" 2>/dev/null || failed "export"
  $M quantize "$O/prune" --calib builtin --json > "$O/quantize.json" 2>/dev/null || failed "quantize"
  $M eval "$O/prune" --data builtin --json > "$O/eval.json" 2>/dev/null || failed "eval"
  $M embed "$O/prune" --data builtin -o "$O/emb.npy" > /dev/null 2>&1 || failed "embed"
}

run_all "$OLD" "$WORK/old"
run_all "$NEW" "$WORK/new"
"$PY" - "$WORK/old" "$WORK/new" <<'PY'
import hashlib, json, re, sys
from pathlib import Path

old, new = map(Path, sys.argv[1:])
bad = sum(len((root / "FAILED").read_text().splitlines()) for root in (old, new) if (root / "FAILED").exists())
def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()
files = sorted(p.relative_to(old) for p in old.rglob("*") if p.suffix in (".safetensors", ".onnx", ".bin", ".npy", ".yaml"))
for rel in files:
    b = new / rel
    if not b.exists() or digest(old / rel) != digest(b):
        bad += 1
        print(f"DIFFERENT {rel}")
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if not re.search(r"seconds|_s$|created|output|artifact|model$|path", k)}
    return [clean(v) for v in x] if isinstance(x, list) else x
for rel in sorted(p.relative_to(old) for p in old.glob("*.json")):
    a, b = (json.loads((root / rel).read_text() or "null") for root in (old, new))
    if clean(a) != clean(b):
        bad += 1
        print(f"DIFFERENT report {rel}")
print(f"{len(files)} files and {len(list(old.glob('*.json')))} reports compared: "
      + ("all the same" if not bad else f"{bad} differ"))
sys.exit(1 if bad else 0)
PY
