"""lmms-eval integration: `python -m lmms_eval --model llava_agile --model_args pretrained=...,
pruning=adaptive,keep=64,pruning_args="erank_avg=90"` (README "Evaluating with lmms-eval").

lmms-eval (0.7.3) finds the model through the `lmms_eval.models` entry point of this package
(setup.py), which names `manifests`; the class lives in `llava_agile.lmms.llava` and is imported
only when lmms-eval resolves the name.
"""


def manifests():
    """The entry point's payload: lmms-eval's ModelManifest for each model this package adds."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="llava_agile",
                          simple_class_path="llava_agile.lmms.llava.LlavaAgile")]
