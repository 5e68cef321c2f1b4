#!/usr/bin/env bash
# The distillation of record of SmolLM2-135M-Instruct's EAGLE-3 drafter on a GPU machine
# (torch + transformers, no vLLM, no atlas-rl install, no network): the prompt mix of
# scripts/distil_drafter.sh (the CPU's), rollouts by the static-cache sampler
# (--generator static-cache) in rounds of 1,024 prompts x 4 completions, each round's
# rollouts trained on twice, bf16 teacher and autocast, the drafter saved in float16
# after every round (docs/distillation.md).
#   bash scripts/distil_drafter_gpu.sh MODEL_DIR DATA_DIR OUT_DIR [SECONDS]
# DATA_DIR holds gsm8k_test.jsonl and humaneval.jsonl.gz; OUT_DIR gets drafter/ (the
# drafter and train_report.json), distill.log and the work directory's state.json and
# heldout.json. Should the run fail early (a CUDA error, memory), the time left goes to
# a second run with transformers' generate in smaller batches, into OUT_DIR/drafter-fallback.
# A smoke run on a CPU: DEVICE=cpu ROUND_PROMPTS=8 GEN_BATCH=8 MAX_TOKENS=8 (the sizes).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="$1" DATA="$2" OUT="$3" SECONDS_ALL="${4:-450}"
START=$(date +%s)
mkdir -p "$OUT"
WORK="${TMPDIR:-/tmp}/atlas-distil-gpu-work"
COMMON=(--model "$MODEL"
        --prompts builtin:code-languages:1592 builtin:instructions:1600 builtin:code:204
                  "$DATA/gsm8k_test.jsonl" "$DATA/humaneval.jsonl.gz"
        --device "${DEVICE:-cuda}" --completions 4 --max-tokens "${MAX_TOKENS:-256}"
        --round-prompts "${ROUND_PROMPTS:-1024}" --vocab-prompts "${ROUND_PROMPTS:-1024}" --train-batch 64 --passes 2 --draft-vocab-size 8192
        --dtype bfloat16 --train-autocast bfloat16 --heldout-rollouts 256
        --save-dtype float16)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
bash "$REPO/scripts/eagle3_distill.sh" "${COMMON[@]}" --generator static-cache --gen-batch "${GEN_BATCH:-512}" \
    --work-dir "$WORK" --out "$OUT/drafter" --time-budget "$SECONDS_ALL" 2>&1 \
    | grep --line-buffered -v -i "warn" | tee "$OUT/distill.log"
RC=${PIPESTATUS[0]}
LEFT=$(( SECONDS_ALL - ($(date +%s) - START) ))
if [ "$RC" -ne 0 ] && [ "$LEFT" -gt 90 ]; then
    echo "[distil_drafter_gpu] the run failed (exit $RC); ${LEFT}s left: transformers' generate" \
        | tee -a "$OUT/distill.log"
    bash "$REPO/scripts/eagle3_distill.sh" "${COMMON[@]}" --generator transformers --gen-batch "$(( ${GEN_BATCH:-512} / 4 ))" \
        --work-dir "$WORK-fallback" --out "$OUT/drafter-fallback" --time-budget "$LEFT" 2>&1 \
        | grep --line-buffered -v -i "warn" | tee -a "$OUT/distill.log"
    RC=${PIPESTATUS[0]}
    WORK="$WORK-fallback"
fi
cp "$WORK/state.json" "$WORK/heldout.json" "$OUT/" 2>/dev/null
echo "[distil_drafter_gpu] exit $RC after $(( $(date +%s) - START ))s"
exit "$RC"
