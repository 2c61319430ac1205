"""transformers-aligngpt: AlignGPT for Hugging Face transformers.

Importing the package registers AlignGPT with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`), so `pipeline("image-text-to-text")` and `from_pretrained` work
like for any model in transformers. Saved checkpoints also carry the model code (`auto_map`), so they load with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_aligngpt import AlignGPTConfig
from .modeling_aligngpt import (
    AlignGPTCausalLMOutputWithPast,
    AlignGPTForConditionalGeneration,
    AlignGPTModel,
    AlignGPTModelOutputWithPast,
    AlignGPTPreTrainedModel,
)
from .processing_aligngpt import (
    VICUNA_V1_CHAT_TEMPLATE,
    VICUNA_V1_SYSTEM_PROMPT,
    AlignGPTProcessor,
    plain_pretraining_text,
)

__version__ = "0.1.0"

AutoConfig.register(AlignGPTConfig.model_type, AlignGPTConfig, exist_ok=True)
AutoModel.register(AlignGPTConfig, AlignGPTModel, exist_ok=True)
AutoModelForImageTextToText.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
AutoProcessor.register(AlignGPTConfig, AlignGPTProcessor, exist_ok=True)

# save_pretrained copies the code next to the weights and records it in `auto_map`
AlignGPTConfig.register_for_auto_class()
AlignGPTModel.register_for_auto_class("AutoModel")
AlignGPTForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
AlignGPTProcessor.register_for_auto_class()

__all__ = [
    "AlignGPTConfig",
    "AlignGPTModel",
    "AlignGPTPreTrainedModel",
    "AlignGPTForConditionalGeneration",
    "AlignGPTModelOutputWithPast",
    "AlignGPTCausalLMOutputWithPast",
    "AlignGPTProcessor",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM_PROMPT",
    "plain_pretraining_text",
]
