#!/usr/bin/env bash
# TextVQA val (LLaVA: scripts/v1_5/eval/textvqa.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/textvqa.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" textvqa "$@"
