#!/usr/bin/env bash
# Shared by eval_scripts/<bench>.sh: `bash eval_scripts/common.sh BENCH [flags]` runs one
# benchmark through the Python driver (python -m llava_agile.eval run BENCH ...), which mirrors
# LLaVA's scripts/v1_5/eval/<bench>.sh. Flags:
#   --pruning METHOD --keep K [--pruning-args k=v,...] [--erank-avg-file F]
#   [--model-path P] [--data-root D] [--out O] [--overwrite] [--max-new-tokens N]
# Multi-GPU: CUDA_VISIBLE_DEVICES=0,1,2,3 bash eval_scripts/gqa.sh ... (one chunk per GPU).
# A patched LLaVA checkout: LLAVA_DIR=/path/to/LLaVA (see patches/apply.sh).
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m llava_agile.eval run "$@"
