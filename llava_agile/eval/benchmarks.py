"""The benchmarks: LLaVA-1.5's data layout under a data root, eval module, download steps.

Paths are relative to the data root (LLaVA's `./playground/data/eval` by default) and match
LLaVA's `scripts/v1_5/eval/*.sh`; `DOWNLOAD` repeats the step from LLaVA's docs/Evaluation.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_ROOT = "./playground/data/eval"
EVAL_ZIP = ("download LLaVA's eval.zip (docs/Evaluation.md: https://drive.google.com/file/d/"
            "1atZSBBrAX54yYpxtVVW33zFvcnaHeFPy) and extract it to ./playground/data/eval")


@dataclass(frozen=True)
class Benchmark:
    name: str
    questions: str            # question file (relative to the data root)
    images: str               # image folder ("" when images are inside the question file)
    annotations: str          # ground truth / split file or folder used by the scorer
    module: str               # LLaVA eval module
    extra_args: tuple = ()    # extra module flags from LLaVA's script
    download: str = EVAL_ZIP
    server: bool = False      # scored by an evaluation server (we write the upload file)
    chunked: bool = False     # LLaVA's script splits it over all GPUs
    metrics: tuple = field(default=())


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images",
              "gqa/data/testdev_balanced_questions.json", "llava.eval.model_vqa_loader",
              download="download GQA (images and questions 1.2) from "
              "https://cs.stanford.edu/people/dorarad/gqa/download.html to "
              "./playground/data/eval/gqa/data (LLaVA docs/Evaluation.md, GQA step 1)",
              chunked=True, metrics=("accuracy",)),
    Benchmark("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
              "textvqa/TextVQA_0.5.1_val.json", "llava.eval.model_vqa_loader",
              download="download https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json "
              "and https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip, extract to "
              "./playground/data/eval/textvqa (LLaVA docs/Evaluation.md, TextVQA step 1)",
              metrics=("accuracy",)),
    Benchmark("pope", "pope/llava_pope_test.jsonl", "pope/val2014", "pope/coco",
              "llava.eval.model_vqa_loader",
              download="download `coco` from https://github.com/AoiDragon/POPE/tree/"
              "e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco to ./playground/data/eval/pope "
              "and COCO val2014 images to pope/val2014 (LLaVA docs/Evaluation.md, POPE step 1)",
              metrics=("f1", "accuracy")),
    Benchmark("mme", "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version",
              "MME/MME_Benchmark_release_version", "llava.eval.model_vqa_loader",
              download="download MME following https://github.com/BradyFU/Awesome-Multimodal-Large-"
              "Language-Models/tree/Evaluation into ./playground/data/eval/MME/"
              "MME_Benchmark_release_version (LLaVA docs/Evaluation.md, MME steps 1-3)",
              metrics=("perception", "total")),
    Benchmark("sqa", "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test", "scienceqa",
              "llava.eval.model_vqa_science", ("--single-pred-prompt",),
              download="download `images`, `pid_splits.json`, `problems.json` from data/scienceqa of "
              "https://github.com/lupantech/ScienceQA into ./playground/data/eval/scienceqa "
              "(LLaVA docs/Evaluation.md, ScienceQA step 1)",
              metrics=("img_accuracy", "accuracy")),
    Benchmark("mmbench", "mmbench/mmbench_dev_20230712.tsv", "", "mmbench/mmbench_dev_20230712.tsv",
              "llava.eval.model_vqa_mmbench", ("--single-pred-prompt",),
              download="download https://download.openmmlab.com/mmclassification/datasets/mmbench/"
              "mmbench_dev_20230712.tsv to ./playground/data/eval/mmbench "
              "(LLaVA docs/Evaluation.md, MMBench step 1)",
              metrics=("circular_accuracy",)),
    Benchmark("mmbench_cn", "mmbench_cn/mmbench_dev_cn_20231003.tsv", "",
              "mmbench_cn/mmbench_dev_cn_20231003.tsv", "llava.eval.model_vqa_mmbench",
              ("--single-pred-prompt", "--lang", "cn"),
              download="download https://download.openmmlab.com/mmclassification/datasets/mmbench/"
              "mmbench_dev_cn_20231003.tsv to ./playground/data/eval/mmbench_cn "
              "(LLaVA docs/Evaluation.md, MMBench-CN step 1)",
              metrics=("circular_accuracy",)),
    Benchmark("vqav2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015",
              "vqav2/llava_vqav2_mscoco_test2015.jsonl", "llava.eval.model_vqa_loader",
              download="download http://images.cocodataset.org/zips/test2015.zip and extract it to "
              "./playground/data/eval/vqav2/test2015 (LLaVA docs/Evaluation.md, VQAv2 step 1)",
              server=True, chunked=True),
    Benchmark("vizwiz", "vizwiz/llava_test.jsonl", "vizwiz/test", "vizwiz/llava_test.jsonl",
              "llava.eval.model_vqa_loader",
              download="download https://vizwiz.cs.colorado.edu/VizWiz_final/vqa_data/Annotations.zip "
              "(test.json) and extract https://vizwiz.cs.colorado.edu/VizWiz_final/images/test.zip to "
              "./playground/data/eval/vizwiz/test (LLaVA docs/Evaluation.md, VizWiz step 1)",
              server=True),
    Benchmark("seed", "seed_bench/llava-seed-bench.jsonl", "seed_bench", "seed_bench/SEED-Bench.json",
              "llava.eval.model_vqa_loader",
              download="download SEED-Bench images and videos following https://github.com/AILab-CVC/"
              "SEED-Bench/blob/main/DATASET.md to ./playground/data/eval/seed_bench/SEED-Bench-image "
              "(and middle video frames to SEED-Bench-video-image; LLaVA docs/Evaluation.md, SEED step 1-2)",
              chunked=True, metrics=("img_accuracy",)),
    Benchmark("mmvet", "mm-vet/llava-mm-vet.jsonl", "mm-vet/images", "mm-vet/llava-mm-vet.jsonl",
              "llava.eval.model_vqa",
              download="extract https://github.com/yuweihao/MM-Vet/releases/download/v1/mm-vet.zip to "
              "./playground/data/eval/mm-vet (LLaVA docs/Evaluation.md, MM-Vet step 1)",
              server=True),
    Benchmark("chair", "chair/llava_chair_val2014_500.jsonl", "chair/val2014",
              "chair/annotations", "llava.eval.model_vqa_loader", ("--max_new_tokens", "512"),
              download="download COCO 2014 val images (http://images.cocodataset.org/zips/val2014.zip) "
              "to ./playground/data/eval/chair/val2014 and annotations_trainval2014.zip "
              "(instances_val2014.json, captions_val2014.json) to chair/annotations, then write the "
              "question file with `python -m llava_agile.eval chair-questions`",
              metrics=("chair_s", "chair_i", "recall")),
]}
SCORED = tuple(b for b in BENCHMARKS if not BENCHMARKS[b].server)


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def paths(name: str, data_root: str | Path = DEFAULT_DATA_ROOT) -> dict[str, str]:
    """Absolute-or-relative paths of a benchmark's data under `data_root`."""
    b, root = get(name), Path(data_root)
    return {"questions": str(root / b.questions),
            "images": str(root / b.images) if b.images else "",
            "annotations": str(root / b.annotations)}


def require(path: str | Path, bench: str, what: str = "data file") -> Path:
    """`path` must exist, else FileNotFoundError naming it and LLaVA's download step."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{bench}: {what} not found: {path}; {get(bench).download}")
    return path
