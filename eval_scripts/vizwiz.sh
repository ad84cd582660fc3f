#!/usr/bin/env bash
# VizWiz test, server-scored: writes the upload file (LLaVA: scripts/v1_5/eval/vizwiz.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/vizwiz.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" vizwiz "$@"
