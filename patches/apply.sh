#!/usr/bin/env bash
# Patch a LLaVA tree for llava_agile: `patches/apply.sh LLAVA_DIR`
#
# LLAVA_DIR is a checkout (the folder holding llava/) or an installed package (the llava/ folder
# itself, e.g. .venv/lib/python3.11/site-packages/llava). Known trees, recognised by the sha256
# of every file listed for them in patches/MANIFEST:
#   llava-v1.2.2.post1  haotian-liu/LLaVA tag v1.2.2.post1 (= the llava-torch 1.2.2.post1 wheel)
#   llava-c121f04       haotian-liu/LLaVA HEAD c121f04
#   fastervlm-f5d5f12   Theia-4869/FasterVLM f5d5f12
# The matching <tree>.patch is applied with `git apply`. An already patched tree is left alone
# (exit 0); any other tree is refused (exit 1) with the files that did not match.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
manifest="$here/MANIFEST"
me="patches/apply.sh"

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: $me LLAVA_DIR   (a LLaVA or FasterVLM checkout, or an installed llava/ package)" >&2
    exit 2
fi
command -v git >/dev/null || { echo "$me: needs git (for git apply)" >&2; exit 2; }
[ -d "$1" ] || { echo "$me: $1: no such directory" >&2; exit 2; }
dir="$(cd "$1" && pwd -P)"

# A checkout holds llava/model/builder.py; a package dir holds model/builder.py itself.
if [ -f "$dir/llava/model/builder.py" ]; then
    prefix=""; strip=1; layout="checkout"
elif [ -f "$dir/model/builder.py" ] && [ -f "$dir/eval/model_vqa_loader.py" ]; then
    prefix="llava/"; strip=2; layout="installed llava/ package"
else
    echo "$me: refusing $dir: neither a LLaVA checkout (llava/model/builder.py) nor an" \
         "installed llava/ package (model/builder.py, eval/model_vqa_loader.py)" >&2
    exit 1
fi

# path as written in MANIFEST (llava/...) -> file on disk
on_disk() { echo "$dir/${1#"$prefix"}"; }

if command -v sha256sum >/dev/null; then sha() { sha256sum "$1"; }; else sha() { shasum -a 256 "$1"; }; fi
hash_of() { if [ -f "$1" ]; then sha "$1" | cut -d' ' -f1; else echo missing; fi; }

best=""; best_score=-1; best_report=""
for tree in $(grep -v '^#' "$manifest" | awk 'NF {print $1}' | uniq); do
    total=0; released=0; patched=0; not_released=""; not_patched=""
    while read -r t path orig new; do
        [ "$t" = "$tree" ] || continue
        total=$((total + 1))
        h="$(hash_of "$(on_disk "$path")")"
        case "$h" in
            "$orig") state="as released" ;;
            "$new") state="already patched" ;;
            missing) state="missing" ;;
            *) state="differs from $tree (sha256 $h)" ;;
        esac
        [ "$h" = "$orig" ] && released=$((released + 1)) || not_released+="    $path: $state"$'\n'
        [ "$h" = "$new" ] && patched=$((patched + 1)) || not_patched+="    $path: $state"$'\n'
    done < <(grep -v '^#' "$manifest")
    if [ "$patched" -eq "$total" ]; then
        echo "$me: $dir ($layout) is $tree, already patched; nothing to do"
        exit 0
    fi
    if [ "$released" -eq "$total" ]; then
        patch="$here/$tree.patch"
        # Stop git from finding an enclosing repository (e.g. a package inside a venv in a repo):
        # the patch paths are relative to $dir.
        export GIT_CEILING_DIRECTORIES="$(dirname "$dir")"
        if ! (cd "$dir" && git apply -p"$strip" --check "$patch" && git apply -p"$strip" "$patch"); then
            echo "$me: git apply of $(basename "$patch") failed in $dir" >&2
            exit 1
        fi
        echo "$me: patched $dir ($layout) as $tree with $(basename "$patch")"
        exit 0
    fi
    if [ "$released" -gt "$best_score" ]; then
        best="$tree ($released of $total files as released)"; best_score="$released"
        best_report="$not_released"
    fi
    if [ "$patched" -gt "$best_score" ]; then
        best="$tree, patched ($patched of $total files as patched)"; best_score="$patched"
        best_report="$not_patched"
    fi
done

{
    echo "$me: refusing $dir ($layout): not a tree patches/ knows, or modified."
    echo "  closest known tree: $best; what did not match:"
    printf '%s' "$best_report"
} >&2
exit 1
