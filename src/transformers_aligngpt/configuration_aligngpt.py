"""AlignGPT configuration.

A composite config in the style of transformers' `LlavaConfig`: a `vision_config` (CLIP or SigLIP vision tower),
a `text_config` (any causal LM that transformers builds from a config) and the AlignGPT-specific fields that
describe the alignment levels (see `../shared/METHOD.md` of the project for the method).
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ALIGNMENT_MODES = ("adaptive", "global", "local", "mean", "fixed")
GATE_TEXT_SCOPES = ("prompt", "conversation")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_aligngpt.AlignGPTConfig",
    "AutoModel": "modeling_aligngpt.AlignGPTModel",
    "AutoModelForImageTextToText": "modeling_aligngpt.AlignGPTForConditionalGeneration",
    "AutoProcessor": "processing_aligngpt.AlignGPTProcessor",
}


# The errors for bad AlignGPT fields, raised by `validate_alignment` at init and by the model where a forward reads a
# field edited since.
def unknown_choice(field: str, value, choices: tuple) -> ValueError:
    return ValueError(f"Unknown {field} {value!r}; choose one of {', '.join(choices)}.")


def check_fixed_alignment_level(level, num_levels: int) -> int:
    """`level`, when `alignment_mode="fixed"` can use it (the strict config keeps it an int or None)."""
    if level is None or not 0 <= level < num_levels:
        raise ValueError(
            f"alignment_mode='fixed' needs fixed_alignment_level in 0..{num_levels - 1}, got {level!r}. Set e.g. "
            f"`config.fixed_alignment_level = {num_levels - 1}`."
        )
    return level


@strict
class AlignGPTConfig(PreTrainedConfig):
    r"""
    Configuration of [`AlignGPTForConditionalGeneration`] / [`AlignGPTModel`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`): the vision tower (`clip_vision_model` by default, CLIP
            ViT-L/14-336 sizes; `siglip_vision_model` also works).
        text_config (`dict` or `PreTrainedConfig`): the language model (`llama` by default; Mistral, Qwen2,
            Gemma, Phi ... anything `AutoModel.from_config` builds).
        image_token_id (`int`): id of the `<image>` placeholder; the processor repeats it once per image feature.
        alignment_token_id (`int`): id of the `<align>` placeholder, right after bos in rows that have an image.
        num_alignment_levels (`int`, defaults to 8): N. Level N-1 is the best aligned one and doubles as the
            *global* alignment in instruction tuning; levels 0..N-2 are the *local* ones mixed by the gate.
        alignment_gate_hidden_size (`int`, defaults to 256): width of the gate's hidden layer.
        alignment_mode (`str`, defaults to `"adaptive"`): how the alignment vector is built when no
            `alignment_levels` are passed to `forward`:
            - `adaptive`: `E[N-1] + softmax(gate(d)) @ E[:N-1]` (the paper),
            - `global`: `E[N-1]` only,
            - `local`: `softmax(gate(d)) @ E[:N-1]` only,
            - `mean`: `E[N-1] + mean(E[:N-1])` (no gate),
            - `fixed`: `E[fixed_alignment_level]`, a level chosen by the user.
        fixed_alignment_level (`int`, *optional*): the level used by `alignment_mode="fixed"`.
        gate_text_scope (`str`, defaults to `"prompt"`): which text tokens the gate averages.
            `conversation` averages every attended text token after bos, answers included when they are in
            `input_ids` (what the original code does in training); `prompt` leaves out supervised tokens
            (`labels != -100`, or what the batch's `gate_text_mask` leaves out), so training sees the same gate
            input as inference for a single-turn prompt. (A multi-turn training row has one `<align>` for the whole
            conversation: its gate reads every question, where inference at turn k reads the turns so far.) With
            either scope, generation's gate reads the prompt alone, cache or no cache (`gate_prompt_length`).
        projector_type (`str`, defaults to `"mlp2x_gelu"`): `mlp2x_gelu` (Linear, GELU, Linear) or `linear`.
        projector_hidden_act (`str`, defaults to `"gelu"`): activation of `mlp2x_gelu` (exact GELU as the original).
        vision_feature_layer (`int` or `list[int]`, defaults to -2): hidden state(s) of the tower that feed the
            projector (several layers are concatenated).
        vision_feature_select_strategy (`str`, defaults to `"default"`): `default` drops the CLS token, `full`
            keeps every token.
        multimodal_projector_bias (`bool`, defaults to `True`): bias in the projector's linear layers.
        suppress_placeholder_logits (`bool`, defaults to `False`): give the `<image>` and `<align>` columns of the
            logits the lowest value, so that the softmax (loss, generation) covers the real vocabulary only. Set by
            the converter of original checkpoints, whose LM head has no such rows: their losses are then reproduced
            exactly (otherwise the two new rows add a little probability mass).
    """

    model_type = "aligngpt"
    # Trainer.evaluate / predict gather every output tensor across processes: the cache and the vision tower's
    # output (a ModelOutput holding None fields) are left out, as transformers leaves out the cache by default
    keys_to_ignore_at_inference = ["cache", "image_outputs"]
    sub_configs_defaults = {
        # CLIP ViT-L/14-336, the tower of the released AlignGPT checkpoints
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    alignment_token_id: int = 32001
    num_alignment_levels: int = 8
    alignment_gate_hidden_size: int = 256
    alignment_mode: str = "adaptive"
    fixed_alignment_level: int | None = None
    gate_text_scope: str = "prompt"
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    multimodal_projector_bias: bool = True
    suppress_placeholder_logits: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            # some LMs (Gemma, small Qwen2) keep the flag in their own config
            self.tie_word_embeddings = True
        # every Auto class, so that a saved checkpoint loads with trust_remote_code=True without this package
        # (save_pretrained records only the class being saved)
        self.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.validate_alignment()

    def validate_alignment(self):
        """Checks the AlignGPT fields, at init. The forward checks again, where it reads them, the fields that can be
        edited afterwards and still matter (`alignment_mode`, `fixed_alignment_level`, `gate_text_scope`; transformers
        checks `vision_feature_select_strategy`), with the same errors and nothing to pay on the valid path."""
        vision_type = getattr(self.vision_config, "model_type", None)
        whole = vision_type in ("clip", "siglip", "siglip2")
        if whole or getattr(self.vision_config, "vision_config", None) is not None:
            # (a whole CLIPConfig builds no tower: image_size and patch_size live in its vision part)
            raise ValueError(
                f"vision_config is a whole {type(self.vision_config).__name__} ({vision_type!r}, text and vision "
                "towers): pass its vision part, e.g. CLIPConfig.from_pretrained(...).vision_config."
            )
        if self.alignment_mode not in ALIGNMENT_MODES:
            raise unknown_choice("alignment_mode", self.alignment_mode, ALIGNMENT_MODES)
        if self.num_alignment_levels < 2:
            raise ValueError(
                f"num_alignment_levels must be at least 2 (one global and at least one local level), got "
                f"{self.num_alignment_levels}."
            )
        if not isinstance(self.alignment_gate_hidden_size, int) or self.alignment_gate_hidden_size < 1:
            raise ValueError(
                f"alignment_gate_hidden_size must be a positive int (the gate's hidden width, 256 in the paper), got "
                f"{self.alignment_gate_hidden_size!r}."
            )
        if self.alignment_mode == "fixed":
            check_fixed_alignment_level(self.fixed_alignment_level, self.num_alignment_levels)
        if self.gate_text_scope not in GATE_TEXT_SCOPES:
            raise unknown_choice("gate_text_scope", self.gate_text_scope, GATE_TEXT_SCOPES)
        if self.projector_type not in PROJECTOR_TYPES:
            raise unknown_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' (drop CLS) or 'full' (keep every token), got "
                f"{self.vision_feature_select_strategy!r}."
            )

    @property
    def num_image_tokens(self) -> int:
        """Image features per image: the tower's patch grid (+1 when `full` keeps the CLS token of CLIP).

        The gate's first layer is as wide as this, so it follows the vision config (576 for CLIP-L/14-336,
        729 for SigLIP-384) instead of being hard-coded.
        """
        grid = self.vision_config.image_size // self.vision_config.patch_size
        has_cls = self.vision_config.model_type.startswith("clip")
        if self.vision_feature_select_strategy == "full":
            return grid * grid + int(has_cls)
        # `default` drops the first token: the CLS token of CLIP; towers without one (SigLIP) lose a patch,
        # exactly as LLaVA-style code does with them
        return grid * grid + int(has_cls) - 1


__all__ = ["AlignGPTConfig", "ALIGNMENT_MODES", "GATE_TEXT_SCOPES", "PROJECTOR_TYPES"]
