#!/usr/bin/env bash
# The CPU distillation of SmolLM2-135M-Instruct's EAGLE-3 drafter, resumable: each run
# continues where the last one stopped (rollouts, held-out set, draft vocabulary, drafter,
# optimizer and prompt cursor live in the work directory), so a CPU carries it from
# session to session. The bundled drafter now comes from a GPU run of the same prompt mix
# (scripts/distil_drafter_gpu.sh); docs/distillation.md says what each does and how far
# it got.
#   bash scripts/distil_drafter.sh [SECONDS]   (this run's time budget; default 3600)
# Environment: ATLAS_RL_DISTIL_DIR (default ~/.cache/atlas-rl/distill/smollm2-135m-instruct-eagle3),
# PYTHON (default .venv/bin/python), DTYPE (the teacher's and training's; default
# bfloat16 where the CPU has bf16 units, else float32).
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-.venv/bin/python}"
DIR="${ATLAS_RL_DISTIL_DIR:-$HOME/.cache/atlas-rl/distill/smollm2-135m-instruct-eagle3}"
DATA="$REPO/../shared/data"
if [ -z "${DTYPE:-}" ]; then
    DTYPE=$("$PY" -c "from atlas_rl.machine import cpu_has_native_bf16 as b; print('bfloat16' if b() else 'float32')")
fi
MODEL=$("$PY" -c "from atlas_rl.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
PROMPTS=(builtin:code-languages:1592 builtin:instructions:1600 builtin:code:204)
for f in "$DATA/gsm8k_test.jsonl" "$DATA/humaneval.jsonl.gz"; do
    [ -f "$f" ] && PROMPTS+=("$f")
done
AUTOCAST=()
[ "$DTYPE" = bfloat16 ] && AUTOCAST=(--train-autocast bfloat16)
mkdir -p "$DIR"
exec "$PY" -m atlas_rl.speculators.eagle3_distill --model "$MODEL" --prompts "${PROMPTS[@]}" \
    --work-dir "$DIR/work" --out "$DIR/drafter" \
    --completions 4 --max-tokens 192 --round-prompts 64 --vocab-prompts 256 --gen-batch 64 \
    --train-batch 16 --draft-vocab-size 8192 --dtype "$DTYPE" "${AUTOCAST[@]}" \
    --generator vllm --heldout-rollouts 96 --save-dtype float16 --time-budget "${1:-3600}" \
    --compare-to "$REPO/atlas_rl/assets/speculators/smollm2-135m-instruct"
