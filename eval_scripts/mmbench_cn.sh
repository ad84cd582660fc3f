#!/usr/bin/env bash
# MMBench-CN dev 20231003 (LLaVA: scripts/v1_5/eval/mmbench_cn.sh)
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/mmbench_cn.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" mmbench_cn "$@"
