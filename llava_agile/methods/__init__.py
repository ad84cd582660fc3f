"""Selection methods as pure tensor functions: `fn(x [N, D], a [N], k, **params)`.

Each returns `(indices or merged features, stats)` for one image; `llava_agile.api` validates
inputs, batches, and sorts. No LLaVA imports here.
"""
from .adaptive import adaptive
from .basic import attention, none, random
from .cdpruner import batch_relevance, cdpruner
from .diversity import diversity, fps
from .holov import holov
from .hybrids import bat, mix, vispruner
from .prumerge import batch_counts, prumerge_plus
from .trim import batch_scores, trim
from .visionzip import visionzip

_RATIO = dict(ratio=0.5, ratio_rule="fixed", ratio_slope=0.5, ratio_min=0.0, ratio_max=1.0,
              erank_avg=90.0, center=True)

# method -> (reference function, default parameters)
REGISTRY = {
    "adaptive": (adaptive, dict(erank_avg=90.0, tau_step=0.01, tau_max=0.25, tau=None,
                                complexity="erank", entropy_avg=4.7, center=True,
                                adaptive_count=False)),
    "attention": (attention, {}),
    "diversity": (diversity, {}),
    "fps": (fps, {}),
    "vispruner": (vispruner, dict(_RATIO, similarity_features=None)),
    "bat": (bat, dict(_RATIO, similarity_features=None, bat_knn=5)),
    "visionzip": (visionzip, dict(keys=None, contextual=None, cls_token=None)),
    "holov": (holov, dict(chunks=16, overflow="zeros")),
    "cdpruner": (cdpruner, dict(image_embeds=None, text_embeds=None, scope="batch")),
    "trim": (trim, dict(image_embeds=None, text_embeds=None, count="fixed", scope="batch")),
    "prumerge_plus": (prumerge_plus, dict(keys=None, count="fixed", scope="batch")),
    "mix": (mix, dict(_RATIO)),
    "random": (random, dict(seed=0)),
    "none": (none, {}),
}
METHODS = tuple(REGISTRY)
# methods that return features, not indices -> why (error messages say "method 'x' <why>, ...")
MERGING = {"bat": "merges tokens", "visionzip": "merges tokens",
           "holov": "returns rows (chunk order, zero rows included)",
           "trim": "merges tokens (the mean of the dropped ones)",
           "prumerge_plus": "merges tokens"}
# the step that sees the whole batch (what couples images): (params, attn [B, N]) -> per-image
# arguments, popping the batch-level ones
BATCH_STEPS = {"cdpruner": batch_relevance, "trim": batch_scores, "prumerge_plus": batch_counts}
# methods conditioned on the question -> text rows each takes per image (None: any number)
TEXT = {"cdpruner": None, "trim": 1}
IMAGE_ONLY = tuple(m for m in METHODS if m not in TEXT)  # the methods that need no question
VISION_SPACE = ("visionzip", "trim", "prumerge_plus")  # official: merge the CLIP features


def variable_count(method: str, params: dict) -> bool:
    """Does the number of tokens per image depend on the image (not only on `keep`)?"""
    return bool(params.get("adaptive_count")) or params.get("count") == "iqr"  # trim, prumerge+
