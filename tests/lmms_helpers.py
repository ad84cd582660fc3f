"""What the lmms-eval tests share (tests/test_lmms_eval.py in .venv, tests/hf/test_hf_lmms_eval.py
in .venv-hf, tests/hf/test_hf_lmms_qwen.py in .venv-hf5): the tiny local task (generated images
in a local parquet; generate_until and multiple_choice variants) and the CLI runners."""
import glob
import json
import os
import socket
import subprocess
import sys

QUESTION = "What color is the box?"

UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return ["red", "green", "blue"]
'''

GEN_YAML = '''task: tiny_agile_gen
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

MC_YAML = '''task: tiny_agile_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: "answer"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''



def write_tasks(root, images, answers) -> str:
    """The parquet and the two task YAMLs under root; returns the --include_path folder."""
    from datasets import Dataset, Features, Image, Value

    Dataset.from_dict({"image": images, "question": [QUESTION] * len(images), "answer": answers},
                      features=Features(image=Image(), question=Value("string"),
                                        answer=Value("string"))
                      ).to_parquet(str(root / "tiny.parquet"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "tiny_agile_gen.yaml").write_text(GEN_YAML.format(parquet=root / "tiny.parquet"))
    (tasks / "tiny_agile_mc.yaml").write_text(MC_YAML.format(parquet=root / "tiny.parquet"))
    return str(tasks)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmms(env, out, model_args, tasks="tiny_agile_gen", model="llava_agile", nproc=1, extra=(),
         more_env=None, timeout=600):
    """Run the lmms-eval CLI; returns (returncode, stdout + stderr, results dict or None)."""
    launcher = [sys.executable, "-m", "lmms_eval"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lmms_eval"]
    cmd = [*launcher, "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", env["tasks"], "--batch_size", "1", "--device", "cpu",
           "--output_path", str(out), "--log_samples", *extra]
    proc_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                    TOKENIZERS_PARALLELISM="false", HF_HOME=env["hf_home"],
                    HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
                    **(more_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=proc_env, timeout=timeout,
                          cwd=str(env["root"]))
    files = glob.glob(os.path.join(str(out), "*", "*_results.json"))
    results = None
    if files:
        with open(files[0]) as f:
            results = json.load(f)
    return proc.returncode, proc.stdout + proc.stderr, results


def lmms_config(env, runs: dict, timeout=600):
    """Several evaluations in one lmms-eval CLI process (`--config`, a YAML list: lmms-eval runs
    each in turn, logging a failed one and going on); runs: name -> dict(model=, model_args=,
    tasks=, batch_size=). Each writes under env["root"] / name. Returns (returncode,
    stdout + stderr, {name: results dict or None})."""
    import yaml

    configs = [dict(model=r["model"], model_args=r["model_args"], tasks=r.get("tasks",
                    "tiny_agile_gen"), include_path=env["tasks"], batch_size=r.get("batch_size", 1),
                    device="cpu", output_path=str(env["root"] / name), log_samples=True)
               for name, r in runs.items()]
    path = env["root"] / f"runs-{len(list(env['root'].glob('runs-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(configs))
    proc_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                    TOKENIZERS_PARALLELISM="false", HF_HOME=env["hf_home"],
                    HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(path)],
                          capture_output=True, text=True, env=proc_env, timeout=timeout,
                          cwd=str(env["root"]))
    results = {}
    for name in runs:
        files = glob.glob(os.path.join(str(env["root"] / name), "*", "*_results.json"))
        results[name] = None
        if files:
            with open(files[0]) as f:
                results[name] = json.load(f)
    return proc.returncode, proc.stdout + proc.stderr, results


def samples(out, task):
    (path,) = glob.glob(os.path.join(str(out), "*", f"*_samples_{task}.jsonl"))
    with open(path) as f:
        return [json.loads(line) for line in f]
