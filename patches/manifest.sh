#!/usr/bin/env bash
# Print the MANIFEST lines of one tree: `patches/manifest.sh TREE PRISTINE_CHECKOUT`
# (for maintainers, after editing TREE.patch; PRISTINE_CHECKOUT holds an unpatched llava/).
# Lists every file TREE.patch touches plus the model files llava_agile hooks into at run time,
# with their sha256 as released and after the patch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
tree="$1"; src="$(cd "$2" && pwd -P)"
patch="$here/$tree.patch"
checked="llava/model/llava_arch.py llava/model/language_model/llava_llama.py
llava/model/multimodal_encoder/clip_encoder.py"
files="$( (grep '^+++ b/' "$patch" | cut -c7-; printf '%s\n' $checked) | sort -u)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
for f in $files; do mkdir -p "$work/$(dirname "$f")"; cp "$src/$f" "$work/$f"; done
declare -A orig
for f in $files; do orig[$f]="$(sha256sum "$work/$f" | cut -d' ' -f1)"; done
(cd "$work" && GIT_CEILING_DIRECTORIES="$(dirname "$work")" git apply "$patch")
for f in $files; do echo "$tree $f ${orig[$f]} $(sha256sum "$work/$f" | cut -d' ' -f1)"; done
