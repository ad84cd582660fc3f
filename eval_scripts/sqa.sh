#!/usr/bin/env bash
# ScienceQA test, CQM-A (LLaVA: scripts/v1_5/eval/sqa.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/sqa.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" sqa "$@"
