#!/usr/bin/env bash
# GQA testdev-balanced (LLaVA: scripts/v1_5/eval/gqa.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/gqa.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" gqa "$@"
