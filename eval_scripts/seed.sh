#!/usr/bin/env bash
# SEED-Bench image questions (LLaVA: scripts/v1_5/eval/seed.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/seed.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" seed "$@"
