#!/usr/bin/env bash
# MMBench dev 20230712 (LLaVA: scripts/v1_5/eval/mmbench.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/mmbench.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" mmbench "$@"
