#!/usr/bin/env bash
# Offline distillation of the EAGLE-3 drafter (atlas_rl/speculators/eagle3_distill.py) on a
# machine with torch + transformers and no atlas-rl install (a GPU machine, say):
#   bash scripts/eagle3_distill.sh --model DIR --prompts A.jsonl B.jsonl.gz --out DIR --device cuda ...
# (all arguments go to `python -m atlas_rl.speculators.eagle3_distill`; see its --help).
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/atlas-eagle3.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/atlas_rl"
for entry in "$REPO"/atlas_rl/*; do ln -s "$entry" "$SHIM/atlas_rl/$(basename "$entry")"; done
ln -s "$REPO/kernels" "$SHIM/atlas_rl/kernels"
ln -s "$REPO/integrations" "$SHIM/atlas_rl/integrations"
ARGS=()
for a in "$@"; do  # relative paths are the caller's
    if [ -e "$a" ]; then ARGS+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")"); else ARGS+=("$a"); fi
done
cd "$SHIM"
PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false \
    exec "${PYTHON:-python3}" -m atlas_rl.speculators.eagle3_distill "${ARGS[@]}"
