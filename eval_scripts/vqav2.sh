#!/usr/bin/env bash
# VQAv2 test-dev, server-scored: writes the upload file (LLaVA: scripts/v1_5/eval/vqav2.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/vqav2.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" vqav2 "$@"
