"""lmms-eval integration: `python -m lmms_eval --model llava_agile --model_args pretrained=...,
pruning=adaptive,keep=64,pruning_args="erank_avg=90"` (README "Evaluating with lmms-eval"),
`--model llava_hf_agile` for transformers' LLaVA-1.5 / LLaVA-NeXT checkpoints (llava-hf/*), and
`--model qwen2_5_vl_agile` / `qwen3_vl_agile` for Qwen2.5-VL / Qwen3-VL (transformers 5.x).

lmms-eval (0.7.3) finds the models through the `lmms_eval.models` entry point of this package
(setup.py), which names `manifests`; the classes live in `llava_agile.lmms.llava`,
`llava_agile.lmms.llava_hf` and `llava_agile.lmms.qwen` and are imported only when lmms-eval
resolves the name. The Qwen ones are chat classes, as lmms-eval's own `qwen2_5_vl` / `qwen3_vl`.
"""


def manifests():
    """The entry point's payload: lmms-eval's ModelManifest for each model this package adds."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="llava_agile",
                          simple_class_path="llava_agile.lmms.llava.LlavaAgile"),
            ModelManifest(model_id="llava_hf_agile",
                          simple_class_path="llava_agile.lmms.llava_hf.LlavaHfAgile"),
            ModelManifest(model_id="qwen2_5_vl_agile",
                          chat_class_path="llava_agile.lmms.qwen.Qwen2_5_VLAgile"),
            ModelManifest(model_id="qwen3_vl_agile",
                          chat_class_path="llava_agile.lmms.qwen.Qwen3_VLAgile")]
