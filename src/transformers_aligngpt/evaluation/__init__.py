"""Evaluation of AlignGPT checkpoints with lmms-eval (`pip install "transformers-aligngpt[eval]"`).

The package registers an lmms-eval model named `aligngpt` through the entry-point group `lmms_eval.models`
(lmms-eval >= 0.7 reads it at start-up), so once the package is installed:

    lmms-eval --model aligngpt --model_args pretrained=PATH_OR_HUB_ID --tasks pope,mme --batch_size 8

The model class lives in `transformers_aligngpt.evaluation.lmms_eval_model` (it imports lmms-eval); this module
stays importable without lmms-eval.
"""

LMMS_EVAL_MODEL_NAME = "aligngpt"
LMMS_EVAL_CLASS_PATH = "transformers_aligngpt.evaluation.lmms_eval_model.AlignGPTLmmsEval"


def lmms_eval_manifest():
    """Entry point of the `lmms_eval.models` group: the manifest that tells lmms-eval where the class is.

    lmms-eval imports the class itself only when `--model aligngpt` is asked for.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_NAME, simple_class_path=LMMS_EVAL_CLASS_PATH)


__all__ = ["LMMS_EVAL_MODEL_NAME", "LMMS_EVAL_CLASS_PATH", "lmms_eval_manifest"]
