#!/usr/bin/env bash
# CHAIR on 500 COCO val2014 images, 'Please describe this image in detail.'
# usage: [CUDA_VISIBLE_DEVICES=0,1,...] bash eval_scripts/chair.sh --pruning METHOD --keep K [flags]
# flags and layout: eval_scripts/common.sh, docs/evaluation.md
exec bash "$(dirname "${BASH_SOURCE[0]}")/common.sh" chair "$@"
