#!/usr/bin/env bash
# Instruction fine-tuning on Alpaca records (loss on the responses only), or on chat conversations (loss on the
# assistant's replies only).
#
#   ./train_alpaca.sh          # gpt2-micro from scratch on alpaca_sample.json into out-alpaca: under a minute on a CPU
#   DATASET_PATH=chat_sample.json ./train_alpaca.sh              # the same on conversations (detected), into out-chat
#   INIT_FROM=gpt2 DATASET_PATH=data/alpaca_data.json MAX_STEPS=2000 ./train_alpaca.sh --device cuda   # fine-tuning
#   NPROC_PER_NODE=8 INIT_FROM=gpt2-medium SEQ_LEN=512 ./train_alpaca.sh
#   LORA_RANK=16 INIT_FROM=gpt2-xl BATCH_SIZE=1 SEQ_LEN=512 ./train_alpaca.sh    # LoRA: adapters on a frozen base
#
# Every variable below can be set from the environment; extra arguments go to train.py as they are.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"  # train.py and the sample data live beside this script

NPROC_PER_NODE="${NPROC_PER_NODE:-1}"          # processes (GPUs) on this machine; 1 runs plain python, more run torchrun
DATASET_PATH="${DATASET_PATH:-$REPO/alpaca_sample.json}"  # a JSON list or JSONL file of Alpaca records or conversations
DATASET_TYPE="${DATASET_TYPE:-}"               # alpaca or chat; empty: chat if the records have "messages" or "conversations"
BATCH_SIZE="${BATCH_SIZE:-8}"                  # examples per micro-batch, per process
SEQ_LEN="${SEQ_LEN:-256}"                      # longest example in tokens: longer responses are cut, longer prompts dropped
MAX_STEPS="${MAX_STEPS:-150}"                  # optimizer steps (0.2-0.4 s each for the defaults on a 2-core CPU)
INIT_FROM="${INIT_FROM:-}"                     # weights to start from (ckpt.pt, out_dir, HF dir, gpt2...); empty: from scratch
# From scratch, the three below default to AdamW at 1e-3 after 20 warmup steps; with INIT_FROM, to train.py's
# fine-tuning recipe (AdamW at a constant 3e-5, no warmup: train.py --help), which keeps what the weights know.
WARMUP_STEPS="${WARMUP_STEPS:-}"               # steps of linear warmup to MAX_LR
MAX_LR="${MAX_LR:-}"                           # peak learning rate
OPTIMIZER="${OPTIMIZER:-}"                     # adamw, or muon
WEIGHT_DECAY="${WEIGHT_DECAY:-}"               # weight decay (empty: train.py's, 0.1; 0 with LORA_RANK)
LORA_RANK="${LORA_RANK:-0}"                    # LoRA: train adapters of this rank, the weights frozen (0: off); its
                                               # defaults are train.py's LoRA recipe (AdamW, no decay: train.py --help)
LORA_ALPHA="${LORA_ALPHA:-}"                   # LoRA scale alpha / rank (empty: 2 x LORA_RANK)
LORA_DROPOUT="${LORA_DROPOUT:-}"               # dropout on the adapters' input (empty: 0)
LORA_TARGETS="${LORA_TARGETS:-}"               # projections adapted, e.g. attn,mlp (empty: all)
OUT_DIR="${OUT_DIR:-}"                         # where ckpt.pt and metrics.jsonl go (empty: out-alpaca, or out-chat)
MODEL="${MODEL:-}"                             # preset when training from scratch (empty: gpt2-micro); INIT_FROM sets the shape otherwise

if [[ -z "$DATASET_TYPE" ]]; then
    # the first records' keys tell (inside a JSON string the quotes would be escaped, so a key is what matches)
    if head -c 65536 "$DATASET_PATH" 2>/dev/null | grep -qE '"(messages|conversations)"[[:space:]]*:'; then
        DATASET_TYPE=chat
    else
        DATASET_TYPE=alpaca  # (a missing file too: train.py says what is wrong with it)
    fi
fi
OUT_DIR="${OUT_DIR:-out-$DATASET_TYPE}"  # one per kind of data: the chat example does not collide with the Alpaca one

args=(--dataset_type "$DATASET_TYPE" --dataset_path "$DATASET_PATH" --batch_size "$BATCH_SIZE" --seq_len "$SEQ_LEN"
      --max_steps "$MAX_STEPS" --out_dir "$OUT_DIR")
if [[ -n "$INIT_FROM" ]]; then
    if [[ -n "$MODEL" ]]; then
        echo "error: set MODEL or INIT_FROM, not both: INIT_FROM's weights decide the model's shape" >&2
        exit 2
    fi
    args+=(--init_from "$INIT_FROM")
elif [[ "$LORA_RANK" -eq 0 ]]; then
    args+=(--model "${MODEL:-gpt2-micro}")
    WARMUP_STEPS="${WARMUP_STEPS:-20}" MAX_LR="${MAX_LR:-1e-3}" OPTIMIZER="${OPTIMIZER:-adamw}"
else
    args+=(--model "${MODEL:-gpt2-micro}")  # (adapters on random weights: a smoke test more than a recipe)
fi
[[ "$LORA_RANK" -ne 0 ]] && args+=(--lora_rank "$LORA_RANK")
[[ -n "$LORA_ALPHA" ]] && args+=(--lora_alpha "$LORA_ALPHA")
[[ -n "$LORA_DROPOUT" ]] && args+=(--lora_dropout "$LORA_DROPOUT")
[[ -n "$LORA_TARGETS" ]] && args+=(--lora_targets "$LORA_TARGETS")
[[ -n "$WEIGHT_DECAY" ]] && args+=(--weight_decay "$WEIGHT_DECAY")
[[ -n "$WARMUP_STEPS" ]] && args+=(--warmup_steps "$WARMUP_STEPS")
[[ -n "$MAX_LR" ]] && args+=(--max_lr "$MAX_LR")
[[ -n "$OPTIMIZER" ]] && args+=(--optimizer "$OPTIMIZER")

if [[ "$NPROC_PER_NODE" -eq 1 ]]; then
    exec python "$REPO/train.py" "${args[@]}" "$@"
else
    exec torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" "$REPO/train.py" "${args[@]}" "$@"
fi
