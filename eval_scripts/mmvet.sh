#!/usr/bin/env bash
# MM-Vet, GPT-4-graded: writes mmvet_results.json (LLaVA: scripts/v1_5/eval/mmvet.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/mmvet.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" mmvet "$@"
