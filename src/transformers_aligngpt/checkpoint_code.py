"""Loading a checkpoint through the code stored with it (`trust_remote_code=True`) while this package is imported.

transformers prefers a class registered in the running process over the code a checkpoint carries (`auto_map`),
and importing this package registers AlignGPT. So in a process that has imported it, `Auto*.from_pretrained(path,
trust_remote_code=True)` runs the installed code, whatever the checkpoint holds. The package's own tools (`aligngpt
chat`, the lmms-eval model) promise the checkpoint's code with that flag (to check a checkpoint whose code differs
from the installed package): they take the class from the checkpoint's `auto_map` here.
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module


def checkpoint_class(pretrained: str, auto_class_name: str, revision: str | None = None):
    """The class the checkpoint's `auto_map` names for `auto_class_name` (e.g. "AutoProcessor"), imported from the
    checkpoint's own code; None when it names none."""
    config_dict, _ = PreTrainedConfig.get_config_dict(pretrained, revision=revision)
    reference = (config_dict.get("auto_map") or {}).get(auto_class_name)
    if reference is None:
        return None
    return get_class_from_dynamic_module(reference, pretrained, revision=revision)


def from_pretrained(auto_class, pretrained: str, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(pretrained, trust_remote_code=..., **kwargs)`, except that with
    `trust_remote_code=True` the checkpoint's own class runs even where this package registered its own."""
    if trust_remote_code:
        cls = checkpoint_class(pretrained, auto_class.__name__, kwargs.get("revision"))
        if cls is not None:
            return cls.from_pretrained(pretrained, trust_remote_code=True, **kwargs)
    return auto_class.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **kwargs)
