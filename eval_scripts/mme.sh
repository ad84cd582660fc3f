#!/usr/bin/env bash
# MME perception + cognition (LLaVA: scripts/v1_5/eval/mme.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/mme.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" mme "$@"
