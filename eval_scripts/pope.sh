#!/usr/bin/env bash
# POPE adversarial/popular/random (LLaVA: scripts/v1_5/eval/pope.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/pope.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" pope "$@"
