"""Convert AlignGPT checkpoints of the original release format into this package's format.

Two entry points:

- `convert_checkpoint`: a full checkpoint of the original code (`aligngpt-7b`, `aligngpt-13b`, ...): its
  `config.json` (LLaVA-style `mm_*` keys + Llama keys), weights as `.bin` (read with `weights_only=True`) or
  `.safetensors`, sharded (index file) or not, and its sentencepiece tokenizer.
- `convert_pretrain_artefact`: the phase-1 artefact `mm_projector_align.bin` (projector + alignment embeddings) put
  on top of a chosen language model and vision tower: the starting point of instruction tuning. The gate does not
  exist after phase 1 and is freshly initialised.

Command line (also `aligngpt convert ...`):

    python -m transformers_aligngpt.convert --checkpoint DIR [--vision-tower DIR_OR_HUB_ID] --output DIR
    python -m transformers_aligngpt.convert --pretrain-artefact FILE --language-model DIR_OR_ID \
        --vision-tower DIR_OR_ID --output DIR

`--output` must be a new or empty folder other than the source (`--overwrite` replaces the weights of an earlier
run there). `--license` records the license for the model card; without it a Vicuna v1.5 / Llama 2 base named in
the config gives `llama2` (AlignGPT-7B/13B), any other base none (and `aligngpt push` warns about the fallback).

What the conversion does:

- every original key is mapped (see `ORIGINAL_KEY_PATTERNS`); a weight left over or a parameter of the new model
  that is not filled is an error. Only buffers that are derived from the config are dropped (the Llama
  `rotary_emb.inv_freq` of old transformers, CLIP's `position_ids`), after checking that they hold what the config
  derives.
- the vision tower comes from the checkpoint's own copy (`vision_tower.vision_tower.vision_model.*`) when present,
  else from `--vision-tower` (the original only records a path from the authors' machine in `mm_vision_tower`).
  Its config and `preprocessor_config.json` always come from `--vision-tower` (default: `mm_vision_tower`).
- `<image>` and `<align>` are added to the tokenizer as special tokens and the embeddings / LM head get one new row
  each, initialised to the mean of the existing rows.
- the tokenizer splits the text at those tokens and gives every chunk its own leading "▁" (the sentencepiece dummy
  prefix): exactly what the original does when it tokenises the text before and after `<image>` separately, so
  the processor's `input_ids` equal the original's with the placeholders expanded. (`Metaspace(prepend_scheme=
  "always")`, i.e. `legacy=True`, which is written to `tokenizer_config.json` so that it survives reloading.)
- the converted config sets `suppress_placeholder_logits=True`: the original LM head has no `<image>`/`<align>`
  rows, so their logits get the lowest value and the softmax (losses, generation) stays over the original
  vocabulary, exactly as in the original.
- gate input: the original averages the text embeddings of the *whole conversation* in training (answers
  included) but of the prompt only at inference. Converted models default to `gate_text_scope="conversation"`,
  which reproduces both (training losses match the original); `--gate-text-scope prompt` gives the consistent
  variant (training leaves the supervised tokens out, like inference).

The original sequence layout `[bos, alignment vector, text, 576 image features at the -200 position, text]` maps to
this package's ids with `convert_original_sequence`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ALIGNMENT_TOKEN = "<align>"
# the original marks the image position in `input_ids` with this id (LLaVA's IMAGE_TOKEN_INDEX)
ORIGINAL_IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

# original `model_type` -> model type of the language model
ORIGINAL_TEXT_MODEL_TYPES = {"aligngpt": "llama", "aligngpt_llama": "llama", "llava": "llama", "llava_llama": "llama"}
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Original key -> key of AlignGPTForConditionalGeneration. The multimodal modules are matched with or without a
# leading `model.` (LLaVA-style code keeps them inside `model`; the tiny reference checkpoint has them at the top).
ORIGINAL_KEY_PATTERNS = [
    (r"^model\.(embed_tokens|layers|norm)\.(.+)$", r"model.language_model.\1.\2"),
    (r"^lm_head\.weight$", r"lm_head.weight"),
    (r"^(?:model\.)?vision_tower\.vision_tower\.(vision_model\..+)$", r"model.vision_tower.\1"),
    (r"^(?:model\.)?mm_projector\.0\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^(?:model\.)?mm_projector\.2\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^(?:model\.)?mm_projector\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^(?:model\.)?align_indicators\.indicator_embs$", r"model.alignment_embeddings.weight"),
    (r"^(?:model\.)?gated_weight_layer\.mlp\.0\.(weight|bias)$", r"model.alignment_gate.fc1.\1"),
    (r"^(?:model\.)?gated_weight_layer\.mlp\.2\.(weight|bias)$", r"model.alignment_gate.fc2.\1"),
]
# buffers that old transformers saved and that are derived from the config (checked, then dropped)
DERIVED_BUFFER_PATTERNS = [
    r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
    r"^(?:model\.)?vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$",
]
ALIGN_EMBEDDINGS_KEY = "model.alignment_embeddings.weight"
GATE_FC1_KEY = "model.alignment_gate.fc1.weight"
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
# key prefixes of this package's layout: a folder whose weights use them has been converted already
CONVERTED_KEY_PREFIXES = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.",
                          "model.alignment_embeddings.", "model.alignment_gate.")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# files `from_pretrained` picks weights from; `--overwrite` removes them from the output folder first
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json")
# Hub ids of base language models under the Llama 2 Community License (AlignGPT-7B/13B are built on Vicuna v1.5);
# the license of any other base is not guessed: `--license` records it
LLAMA2_BASES = re.compile(r"^(lmsys/vicuna-(7b|13b)-v1\.5(-16k)?|meta-llama/Llama-2-(7b|13b|70b)(-chat)?-hf)$",
                          re.IGNORECASE)


class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully (unknown keys, missing weights, unsupported settings)."""


# ---------------------------------------------------------------------------------------------------------------
# reading the original format
# ---------------------------------------------------------------------------------------------------------------


def load_original_config(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ConversionError(f"No config.json in {checkpoint}: not a checkpoint of the original format.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}): a damaged download?") from error
    # this package's config has the same model_type (`aligngpt`) but nests the parts and has no LLaVA `mm_*` keys
    if "text_config" in config or (
        config.get("model_type") == "aligngpt" and not any(key.startswith("mm_") for key in config)
    ):
        raise ConversionError(
            f"{checkpoint} is already converted (its config.json is this package's AlignGPT config: text_config / "
            "vision_config, no mm_* keys). Load it with AutoModelForImageTextToText.from_pretrained, or upload it "
            f"with `aligngpt push --model {checkpoint}`; --checkpoint takes a checkpoint of the original release."
        )
    return config


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (a shard the index names, or a wrong path?).")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ConversionError(
                f"{path} is not a readable safetensors file ({error}): truncated or damaged, download it again."
            ) from error
    # `weights_only=True`: tensors and plain containers only, never arbitrary pickled objects
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # the weights-only unpickler refused the file: not a torch.save'd state dict (garbage, another format), or
        # one holding objects other than tensors, which are never unpickled here. Its message is a long how-to
        # about weights_only=False, which is not the fix: keep the reason only.
        text = str(error)
        reason = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler error:" in text else text
        reason = reason.splitlines()[0].split(". Please")[0] if reason else type(error).__name__
        raise ConversionError(
            f"{path} is not a plain state dict of tensors (torch.load(weights_only=True) refused it: {reason}). A "
            "damaged download, another file format, or a pickle holding other objects, which is not unpickled."
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        reason = str(error).split("\n")[0]
        raise ConversionError(
            f"{path} cannot be read as a PyTorch weight file ({reason}): truncated or damaged, download it again."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path} does not hold a flat state dict of tensors.")
    return state_dict


def load_original_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: `model.safetensors[.index.json]` or `pytorch_model.bin[.index.json]`."""
    folder = Path(checkpoint)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConversionError(f"{index_path} is not a weight index (JSON with a weight_map): {error}") from error
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(_load_weight_file(folder / shard))
            missing = sorted(set(weight_map) - set(state_dict))
            if missing:
                raise ConversionError(f"{index_name} lists tensors that its shards do not hold: {missing[:10]}")
            return state_dict
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_weight_file(folder / name)
    raise ConversionError(
        f"No weights in {checkpoint} (expected model.safetensors, pytorch_model.bin or a sharded index of them)."
    )


def _resolve_path_or_id(value: str, relative_to: Path | None = None) -> str:
    """A local folder (as given, or relative to `relative_to`) or else the string as a Hub id."""
    if os.path.isdir(value):
        return value
    if relative_to is not None and not os.path.isabs(value) and (relative_to / value).is_dir():
        return str(relative_to / value)
    return value


def _torch_dtype(dtype: str | torch.dtype | None, original_config: dict | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        name = (original_config or {}).get("torch_dtype") or (original_config or {}).get("dtype") or "float32"
        return DTYPES.get(str(name).replace("torch.", ""), torch.float32)
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------


def load_vision_config(vision_tower: str):
    """The vision tower's config (`clip_vision_model` / `siglip_vision_model`), also from a full CLIP checkpoint."""
    from transformers import AutoConfig

    from .cli import looks_like_path

    if looks_like_path(vision_tower) and not os.path.isdir(os.path.expanduser(vision_tower)):
        raise ConversionError(f"Vision tower {vision_tower}: no such folder (and not a Hub id); pass --vision-tower "
                              "with the CLIP/SigLIP checkpoint folder or Hub id.")
    if os.path.isdir(vision_tower) and not (Path(vision_tower) / "config.json").is_file():
        raise ConversionError(
            f"Vision tower {vision_tower} has no config.json: expected a CLIP/SigLIP checkpoint folder (config.json, "
            "preprocessor_config.json and, unless the checkpoint holds a copy of the tower, its weights)."
        )
    try:
        config = AutoConfig.from_pretrained(vision_tower)
    except ValueError as error:  # a config.json transformers does not know (or not a model config at all)
        raise ConversionError(f"Vision tower {vision_tower}: its config.json is not a CLIP/SigLIP config "
                              f"({str(error).splitlines()[0]}).") from error
    vision_config = getattr(config, "vision_config", None) or config
    # a Hub id is worth keeping in the converted config; a local path of the converting machine is not
    vision_config._name_or_path = "" if os.path.isdir(vision_tower) else vision_tower
    if not vision_config.model_type.endswith("_vision_model"):
        raise ConversionError(f"{vision_tower} is not a vision tower (model_type {vision_config.model_type!r}).")
    return vision_config


def build_text_config(original_config: dict, vocab_size: int | None = None):
    """A LlamaConfig (or the model type the original `model_type` stands for) from the original's top-level keys."""
    import dataclasses

    from transformers import AutoConfig

    model_type = original_config.get("model_type", "aligngpt")
    text_model_type = ORIGINAL_TEXT_MODEL_TYPES.get(model_type)
    if text_model_type is None:
        raise ConversionError(
            f"Unknown original model_type {model_type!r}; known: {', '.join(sorted(ORIGINAL_TEXT_MODEL_TYPES))}."
        )
    config_class = type(AutoConfig.for_model(text_model_type))
    fields = {field.name for field in dataclasses.fields(config_class)}
    kwargs = {
        key: value
        for key, value in original_config.items()
        if key in fields and key not in ("rope_parameters", "dtype", "architectures", "transformers_version")
    }
    # RoPE: 4.31-era `rope_scaling` ({"type": "linear", "factor": 2}) and `rope_theta` -> `rope_parameters`
    rope_parameters = dict(original_config.get("rope_parameters") or original_config.get("rope_scaling") or {})
    if "type" in rope_parameters:
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type"))
    rope_parameters.setdefault("rope_type", "default")
    rope_parameters.setdefault("rope_theta", float(original_config.get("rope_theta", 10000.0)))
    kwargs["rope_parameters"] = rope_parameters
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return config_class(**kwargs)


def _check_original_options(original_config: dict) -> None:
    unsupported = []
    if original_config.get("mm_use_im_start_end"):
        unsupported.append("mm_use_im_start_end=true (<im_start>/<im_end> around the image)")
    if original_config.get("mm_use_im_patch_token"):
        unsupported.append("mm_use_im_patch_token=true")
    if original_config.get("mm_patch_merge_type", "flat") != "flat":
        unsupported.append(f"mm_patch_merge_type={original_config['mm_patch_merge_type']!r}")
    if original_config.get("image_aspect_ratio") not in (None, "", "pad", "square"):
        unsupported.append(f"image_aspect_ratio={original_config['image_aspect_ratio']!r}")
    if unsupported:
        raise ConversionError("Unsupported settings of the original checkpoint: " + "; ".join(unsupported))


def build_aligngpt_config(
    text_config,
    vision_config,
    *,
    projector_type: str,
    vision_feature_layer: int,
    vision_select_feature: str,
    num_alignment_levels: int,
    alignment_gate_hidden_size: int,
    image_token_id: int,
    alignment_token_id: int,
    mm_hidden_size: int | None = None,
    gate_text_scope: str = "conversation",
    multimodal_projector_bias: bool = True,
):
    from .configuration_aligngpt import AlignGPTConfig

    if vision_select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConversionError(
            f"Unknown mm_vision_select_feature {vision_select_feature!r}; known: "
            f"{', '.join(SELECT_FEATURE_TO_STRATEGY)}."
        )
    if mm_hidden_size is not None and mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"mm_hidden_size is {mm_hidden_size} but the vision tower's hidden size is {vision_config.hidden_size}: "
            "wrong --vision-tower?"
        )
    return AlignGPTConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        alignment_token_id=alignment_token_id,
        num_alignment_levels=num_alignment_levels,
        alignment_gate_hidden_size=alignment_gate_hidden_size,
        alignment_mode="adaptive",
        gate_text_scope=gate_text_scope,
        projector_type=projector_type,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=SELECT_FEATURE_TO_STRATEGY[vision_select_feature],
        multimodal_projector_bias=multimodal_projector_bias,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        # the original LM head has no <image>/<align> rows: keep its softmax over the real vocabulary
        suppress_placeholder_logits=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------


def _check_derived_buffer(key: str, tensor: torch.Tensor, text_config) -> None:
    """Old checkpoints store buffers that the config derives; a mismatch means the config is read wrongly."""
    if key.endswith("rotary_emb.inv_freq"):
        if text_config.rope_parameters.get("rope_type", "default") not in ("default", "linear", "dynamic"):
            return  # scaled frequencies (e.g. llama3): nothing simple to compare with
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        theta = text_config.rope_parameters.get("rope_theta", 10000.0)
        expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-2, atol=1e-6):
            raise ConversionError(
                f"{key} does not match rope_theta={theta} and head_dim={head_dim} of the config: the converted "
                "model would place positions differently. Check rope_theta / rope_scaling in config.json."
            )
    elif key.endswith("position_ids") and not torch.equal(tensor.view(-1).long(), torch.arange(tensor.numel())):
        raise ConversionError(f"{key} is not 0..n-1; the vision tower copy is unusual, refusing to drop it.")


def map_original_state_dict(
    original_state_dict: dict[str, torch.Tensor], text_config=None
) -> dict[str, torch.Tensor]:
    """Renames every original key to this package's names. Unknown keys are an error, never dropped."""
    mapped, unknown = {}, []
    for key, tensor in original_state_dict.items():
        if any(re.match(pattern, key) for pattern in DERIVED_BUFFER_PATTERNS):
            if text_config is not None:
                _check_derived_buffer(key, tensor, text_config)
            continue
        for pattern, replacement in ORIGINAL_KEY_PATTERNS:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key)
                if new_key in mapped:
                    raise ConversionError(f"Two original keys map to {new_key} (the second is {key}).")
                mapped[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown and all(key.startswith(CONVERTED_KEY_PREFIXES) for key in unknown):
        raise ConversionError(
            f"The weights are already in this package's layout ({min(unknown)}, ...): the folder has been "
            "converted already; load it with AutoModelForImageTextToText.from_pretrained instead of converting it."
        )
    if unknown:
        raise ConversionError(
            f"{len(unknown)} weights of the checkpoint have no place in the converted model: {sorted(unknown)[:20]}"
        )
    return mapped


def _projector_type_from_keys(state_dict: dict[str, torch.Tensor]) -> str:
    if "model.multi_modal_projector.linear_2.weight" in state_dict:
        return "mlp2x_gelu"
    if "model.multi_modal_projector.linear_1.weight" in state_dict:
        return "linear"
    raise ConversionError("The weights hold no multimodal projector (mm_projector.*).")


def load_vision_tower_state_dict(vision_tower: str, vision_config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tower's weights (`vision_model.*`), from a vision-only or a full CLIP/SigLIP checkpoint."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    tower_class = MODEL_MAPPING[type(vision_config)]
    tower, info = tower_class.from_pretrained(
        vision_tower, config=vision_config, dtype=dtype, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ConversionError(f"{vision_tower} lacks weights of the vision tower: {sorted(info['missing_keys'])[:10]}")
    return {f"model.vision_tower.{key}": value for key, value in tower.state_dict().items()}


def _append_new_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Rows for the new tokens: the mean of the existing rows, the k-th moved by k/10 of their per-dimension spread,
    so that no two new rows are equal. Their values never reach the LM (the placeholders are replaced), but the
    model finds `<image>` and `<align>` in `inputs_embeds` by comparing with their rows, which must differ."""
    if new_rows <= 0:
        return weight
    rows = weight.float()
    steps = torch.arange(new_rows, dtype=torch.float32).unsqueeze(1) / 10
    new = (rows.mean(0) + steps * rows.std(0)).to(weight.dtype)
    return torch.cat([weight, new], dim=0)


def resize_vocabulary(state_dict: dict[str, torch.Tensor], new_vocab_size: int, tie_word_embeddings: bool) -> None:
    """Appends rows (about the mean of the existing ones, pairwise distinct) to the input embeddings and the LM head,
    in place."""
    old = state_dict[EMBED_KEY].shape[0]
    state_dict[EMBED_KEY] = _append_new_rows(state_dict[EMBED_KEY], new_vocab_size - old)
    if LM_HEAD_KEY in state_dict:
        head = state_dict[LM_HEAD_KEY]
        state_dict[LM_HEAD_KEY] = _append_new_rows(head, new_vocab_size - head.shape[0])
    elif tie_word_embeddings:
        state_dict[LM_HEAD_KEY] = state_dict[EMBED_KEY]


def _match_vision_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """`vision_model.` inside the tower: transformers 5 keeps CLIP/SigLIP vision layers at the top of the vision
    model (`vision_tower.embeddings...`), older code nests them (`vision_tower.vision_model.embeddings...`)."""
    nested, flat = "model.vision_tower.vision_model.", "model.vision_tower."
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(nested) and key not in expected and flat + key[len(nested):] in expected:
            key = flat + key[len(nested):]
        elif key.startswith(flat) and key not in expected and nested + key[len(flat):] in expected:
            key = nested + key[len(flat):]
        renamed[key] = value
    return renamed


def build_model_from_state_dict(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """Builds `AlignGPTForConditionalGeneration` without initialising its weights and loads `state_dict` strictly.

    A key of the state dict without a parameter, or a parameter without a key, is an error.
    """
    from accelerate import init_empty_weights

    from .modeling_aligngpt import AlignGPTForConditionalGeneration

    state_dict = {
        key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()
    }
    # parameters on the meta device (filled by `assign=True` below); buffers (rotary frequencies, CLIP position
    # ids) are computed from the config as usual
    with init_empty_weights(include_buffers=False):
        model = AlignGPTForConditionalGeneration(config)
    expected = set(model.state_dict())
    state_dict = _match_vision_prefix(state_dict, expected)
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ConversionError(
            "The converted weights do not fill the model exactly.\n"
            f"  parameters without a weight ({len(missing)}): {missing[:20]}\n"
            f"  weights without a parameter ({len(unexpected)}): {unexpected[:20]}"
        )
    for key, param in model.state_dict().items():
        if param.shape != state_dict[key].shape:
            raise ConversionError(f"{key}: the checkpoint has shape {tuple(state_dict[key].shape)}, the model "
                                  f"expects {tuple(param.shape)}.")
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    on_meta = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise ConversionError(f"Tensors left unfilled after loading: {on_meta[:10]}")
    model.config.dtype = dtype
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# tokenizer, processor, generation config
# ---------------------------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer, model_max_length: int | None = None):
    """Sets the pad token (unk, like the original) and left padding for generation.

    Sentencepiece (Metaspace) tokenizers give each chunk between special tokens its own dummy-prefix "▁", as the
    original tokenises the text before and after `<image>` separately ([`prefix_every_chunk`]).
    """
    from .processing_aligngpt import prefix_every_chunk

    for token in (IMAGE_TOKEN, ALIGNMENT_TOKEN):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ConversionError(f"The tokenizer does not know {token}: load it with `load_tokenizer`.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model_max_length:
        tokenizer.model_max_length = model_max_length

    prefix_every_chunk(tokenizer)
    return tokenizer


def load_tokenizer(path: str, model_max_length: int | None = None, config=None):
    """The checkpoint's tokenizer with `<image>` and `<align>` added as named special tokens (`tokenizer.image_token`,
    `tokenizer.alignment_token`), new ids at the end of the vocabulary, prepared by `prepare_tokenizer`."""
    from transformers import AutoTokenizer

    # `config`: the language model's, so that AutoTokenizer does not read the original config.json (its
    # model_type `aligngpt` names this package's config, which the original keys do not fit)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, config=config, extra_special_tokens={"image_token": IMAGE_TOKEN, "alignment_token": ALIGNMENT_TOKEN}
        )
    except ValueError as error:
        if not (Path(path) / "tokenizer.model").is_file():
            raise
        # transformers falls back to a tiktoken reader when sentencepiece/protobuf cannot read the model file
        raise ConversionError(
            f"Could not read the sentencepiece tokenizer {Path(path) / 'tokenizer.model'} ({error}). It needs the "
            "`sentencepiece` and `protobuf` packages, with a protobuf runtime at least as new as the generated code "
            "of the installed sentencepiece (see the warning above)."
        ) from error
    return prepare_tokenizer(tokenizer, model_max_length=model_max_length)


def build_image_processor(vision_tower: str, pad_to_square: bool):
    """LLaVA-1.5 preprocessing from the tower's `preprocessor_config.json` (PIL backend, no torchvision).

    `pad_to_square=True` is the original's `image_aspect_ratio="pad"`: pad with the mean colour
    (`int(255 * mean)` per channel), then the tower's resize / centre crop / normalisation.
    """
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    settings, _ = ImageProcessingMixin.get_image_processor_dict(
        vision_tower, image_processor_filename="preprocessor_config.json"
    )
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kwargs = {key: settings[key] for key in keys if key in settings}
    # very old configs store bare ints
    if isinstance(kwargs.get("size"), int):
        kwargs["size"] = {"shortest_edge": kwargs["size"]}
    if isinstance(kwargs.get("crop_size"), int):
        kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
    return LlavaImageProcessorPil(do_pad=pad_to_square, **kwargs)


def build_generation_config(checkpoint: str | None, tokenizer, text_config):
    from transformers import GenerationConfig

    settings = {}
    if checkpoint is not None and (Path(checkpoint) / "generation_config.json").is_file():
        settings = json.loads((Path(checkpoint) / "generation_config.json").read_text())
    for key in ("_from_model_config", "transformers_version"):
        settings.pop(key, None)
    for name in ("bos_token_id", "eos_token_id"):
        from_tokenizer = getattr(tokenizer, name)
        settings.setdefault(name, from_tokenizer if from_tokenizer is not None else getattr(text_config, name))
    settings["pad_token_id"] = tokenizer.pad_token_id
    return GenerationConfig(**settings)


def _hub_ids(*names) -> list[str]:
    """The names that are Hub ids (not local folders or paths): the card's `base_model` metadata."""
    from .cli import looks_like_path

    ids = [str(n) for n in names if n and not os.path.isdir(str(n)) and not looks_like_path(str(n))]
    return list(dict.fromkeys(ids))


def _default_license(language_model: str | None) -> str | None:
    """The license a converted checkpoint inherits from its base LLM, where it is known (Vicuna v1.5 / Llama 2:
    `llama2`); None otherwise (then `--license` says it, and `aligngpt push` warns about the apache-2.0 fallback)."""
    return "llama2" if language_model and LLAMA2_BASES.match(language_model) else None


def _card_facts(summary: str, *, source: str, language_model: str | None, vision_tower: str | None,
                license: str | None) -> dict:
    """What the converter knows for the model card (`aligngpt_card_info.json`)."""
    facts = {"summary": summary, "base_models": _hub_ids(language_model, vision_tower),
             "source": {"converted_from": source, "language_model": language_model, "vision_tower": vision_tower}}
    facts["source"] = {key: value for key, value in facts["source"].items() if value}
    license = license or _default_license(language_model)
    if license:
        facts["license"] = license
    else:
        logger.warning("The license of the converted model is not known (base language model: %s): pass --license "
                       "(e.g. llama2 for Vicuna v1.5 / Llama 2 bases), or the model card falls back to apache-2.0.",
                       language_model or "unknown")
    return facts


def check_output_dir(output_dir: str | os.PathLike | None, *, sources=(), overwrite: bool = False) -> None:
    """Before any work: the output folder is none of the sources, and is empty unless `overwrite`."""
    if output_dir is None:
        return
    output = Path(output_dir).expanduser()
    for source in sources:
        if source is not None and os.path.exists(source) and output.resolve() == Path(source).resolve():
            raise ConversionError(
                f"--output {output_dir} is the source folder {source}: the converted files would overwrite the "
                "original's (config.json, tokenizer files). Give another --output folder."
            )
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output_dir} is a file, not a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output {output_dir} is not empty: files of an earlier run would stay beside the new ones (a stale "
            "model.safetensors.index.json or pytorch_model.bin is loaded instead of, or mixed with, the new "
            "weights). Give a new or empty folder, or pass --overwrite to replace the weights there."
        )


def _remove_stale_weights(output_dir: Path) -> None:
    """`--overwrite`: removes the weight files (and indexes) of an earlier run. Only those: they are what
    `from_pretrained` would pick up instead of, or mixed with, the new weights (an index wins over
    model.safetensors; a .bin is read beside it). Every other file the conversion writes is replaced by name, and
    files it does not write (a README, notes) may be the user's, so they are left alone."""
    for path in output_dir.iterdir():
        if path.is_file() and path.name.endswith(WEIGHT_FILE_SUFFIXES):
            logger.info("--overwrite: removing %s", path)
            path.unlink()


def _finish(model, tokenizer, image_processor, generation_config, output_dir, push_to_hub, private, max_shard_size,
            card_info, overwrite=False):
    from .hub import push_to_hub as push_with_card
    from .hub import save_card_info
    from .processing_aligngpt import AlignGPTProcessor

    # the model's LM vocabulary covers the tokenizer (placeholder ids included)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ConversionError("The tokenizer has more tokens than the converted embeddings.")
    model.generation_config = generation_config
    processor = AlignGPTProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=model.config.num_image_tokens
    )
    if output_dir is not None:
        if overwrite and Path(output_dir).is_dir():
            _remove_stale_weights(Path(output_dir))
        model.save_pretrained(output_dir, max_shard_size=max_shard_size)
        processor.save_pretrained(output_dir)
        # what the card says about this checkpoint, for `aligngpt push --model OUTPUT` later
        save_card_info(output_dir, card_info)
        logger.info("Saved the converted model and processor to %s", output_dir)
    if push_to_hub:
        # as `aligngpt push` does: model, processor, remote code and the AlignGPT model card, in one commit
        push_with_card(model, push_to_hub, processor=processor, private=private, max_shard_size=max_shard_size,
                       card_info=card_info, commit_message="Upload AlignGPT converted from the original release")
        logger.info("Pushed the converted model and processor to %s", push_to_hub)
    return model, processor


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    vision_tower: str | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    gate_text_scope: str = "conversation",
    push_to_hub: str | None = None,
    private: bool | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    license: str | None = None,
):
    """Converts a full checkpoint of the original format. Returns `(model, processor)` (also saved / pushed).

    Args:
        checkpoint: folder with the original `config.json`, weights and tokenizer.
        vision_tower: folder or Hub id of the CLIP tower (config + `preprocessor_config.json`; also the weights when
            the checkpoint has no copy of the tower). Defaults to `mm_vision_tower` of the config (relative paths
            are resolved against the checkpoint folder).
        dtype: `auto` (the checkpoint's `torch_dtype`), `float32`, `float16` or `bfloat16`.
        gate_text_scope: `conversation` (the original: answers are in the gate's text mean in training) or `prompt`.
        overwrite: write into a non-empty `output_dir`, removing the weight files of an earlier run first.
        license: Hub license id for the model card (default: `llama2` for a Vicuna v1.5 / Llama 2 base named in
            the config's `_name_or_path`, else none recorded).
    """
    from .cli import looks_like_path

    source = str(checkpoint)  # as the user gave it: the card names the source by it
    checkpoint = Path(checkpoint)
    vision_tower = str(vision_tower) if vision_tower is not None else None
    # cheap checks first: nothing is loaded before the folders are known to fit
    original_config = load_original_config(checkpoint)
    check_output_dir(output_dir, sources=[checkpoint, vision_tower], overwrite=overwrite)
    _check_original_options(original_config)
    torch_dtype = _torch_dtype(dtype, original_config)
    _refuse_phase1_folder(checkpoint)
    if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"No tokenizer in {checkpoint} (tokenizer.model or tokenizer.json): copy the tokenizer files of the "
            "original release into it. Without them the converted model would get a tokenizer that does not fit "
            f"its {original_config.get('vocab_size', '?')}-token vocabulary."
        )

    configured_tower = original_config.get("mm_vision_tower") or original_config.get("vision_tower")
    if vision_tower is None:
        if configured_tower is None:
            raise ConversionError("The config names no vision tower (mm_vision_tower); pass --vision-tower.")
        vision_tower = _resolve_path_or_id(configured_tower, relative_to=checkpoint)
        # (the tower the config names is a source too: --overwrite would replace its weights and config)
        check_output_dir(output_dir, sources=[vision_tower], overwrite=overwrite)
        # releases record a path of the authors' machine: a path that is not here is no Hub id either
        if looks_like_path(vision_tower) and not os.path.isdir(vision_tower):
            raise ConversionError(
                f"config.json names the vision tower {configured_tower!r} (mm_vision_tower), a path that does not "
                "exist here (the original records a path of the machine it was trained on): pass --vision-tower "
                "with the tower's folder or Hub id, e.g. openai/clip-vit-large-patch14-336 for AlignGPT-7B/13B."
            )
        logger.info("Using the vision tower of the config: %s", vision_tower)
        try:
            vision_config = load_vision_config(vision_tower)
        except OSError as error:
            raise ConversionError(
                f"Cannot load the vision tower {vision_tower!r} that config.json names (mm_vision_tower): "
                f"{str(error).splitlines()[0]} Pass --vision-tower with the tower's folder or Hub id."
            ) from error
    else:
        vision_config = load_vision_config(vision_tower)

    text_config = build_text_config(original_config)
    state_dict = map_original_state_dict(load_original_state_dict(checkpoint), text_config)
    if not any(key.startswith("model.vision_tower.") for key in state_dict):
        logger.info("The checkpoint has no copy of the vision tower; loading it from %s", vision_tower)
        state_dict.update(load_vision_tower_state_dict(vision_tower, vision_config, torch_dtype))

    configured = original_config.get("mm_projector_type", "linear")
    projector_type = _projector_type_from_keys(state_dict)
    if configured != projector_type:
        raise ConversionError(f"config.json says mm_projector_type={configured!r} but the weights hold a "
                              f"{projector_type!r} projector.")
    for key in (ALIGN_EMBEDDINGS_KEY, GATE_FC1_KEY):
        if key not in state_dict:
            raise ConversionError(f"The checkpoint has no {key} (align_indicators / gated_weight_layer): not an "
                                  "instruction-tuned AlignGPT checkpoint? Use --pretrain-artefact for phase-1 output.")

    tokenizer = load_tokenizer(str(checkpoint), model_max_length=original_config.get("tokenizer_model_max_length"),
                               config=text_config)
    _check_tokenizer_fits(tokenizer, state_dict[EMBED_KEY].shape[0], checkpoint)
    vocab_size = max(len(tokenizer), state_dict[EMBED_KEY].shape[0])
    text_config.vocab_size = vocab_size
    resize_vocabulary(state_dict, vocab_size, bool(text_config.tie_word_embeddings))

    config = build_aligngpt_config(
        text_config,
        vision_config,
        projector_type=projector_type,
        vision_feature_layer=int(original_config.get("mm_vision_select_layer", -2)),
        vision_select_feature=original_config.get("mm_vision_select_feature", "patch"),
        num_alignment_levels=state_dict[ALIGN_EMBEDDINGS_KEY].shape[0],
        alignment_gate_hidden_size=state_dict[GATE_FC1_KEY].shape[0],
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        alignment_token_id=tokenizer.convert_tokens_to_ids(ALIGNMENT_TOKEN),
        mm_hidden_size=original_config.get("mm_hidden_size"),
        gate_text_scope=gate_text_scope,
        multimodal_projector_bias="model.multi_modal_projector.linear_1.bias" in state_dict,
    )
    _check_gate_width(config, state_dict)
    model = build_model_from_state_dict(config, state_dict, torch_dtype)

    image_processor = build_image_processor(vision_tower, original_config.get("image_aspect_ratio") == "pad")
    generation_config = build_generation_config(str(checkpoint), tokenizer, text_config)
    # the LLM the release was built on, where its config says so with a Hub id (old transformers saved
    # `_name_or_path`; a path of the authors' machine says nothing here)
    language_model = next(iter(_hub_ids(original_config.get("_name_or_path"))), None)
    # the tower: the Hub id it was given by, else the one config.json names (not a local path)
    tower_id = next(iter(_hub_ids(vision_tower) or _hub_ids(configured_tower)), None)
    card_info = _card_facts(
        f"Converted from the original AlignGPT release format (`{source}`) with `aligngpt convert` from "
        "transformers-aligngpt: every weight is the original's; the vocabulary gains the `<image>` and `<align>` "
        "placeholders.",
        source=source, language_model=language_model, vision_tower=tower_id, license=license,
    )
    return _finish(model, tokenizer, image_processor, generation_config, output_dir, push_to_hub, private,
                   max_shard_size, card_info, overwrite)


def _check_tokenizer_fits(tokenizer, vocab_rows: int, checkpoint) -> None:
    """The original tokenizer covers the embedding rows exactly, so that `<image>` / `<align>` get new ids after
    them; a smaller one (a missing or wrong tokenizer.model) would give them ids of real rows."""
    size = len(tokenizer) - 2  # before <image> and <align>
    ids = sorted(tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, ALIGNMENT_TOKEN))
    if size != vocab_rows or ids != [vocab_rows, vocab_rows + 1]:
        raise ConversionError(
            f"The tokenizer in {checkpoint} has {size} tokens but the checkpoint's vocabulary (vocab_size, "
            f"embedding rows) has {vocab_rows}: a wrong or incomplete tokenizer (tokenizer.model missing?). "
            "Copy the tokenizer files of the original release into the folder."
        )


def _check_gate_width(config, state_dict):
    width = state_dict[GATE_FC1_KEY].shape[1]
    if width != config.num_image_tokens:
        raise ConversionError(
            f"The gate reads {width} image positions but the vision tower with "
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} gives "
            f"{config.num_image_tokens} image features: wrong --vision-tower or mm_vision_select_feature?"
        )


PHASE1_ARTEFACT_NAMES = ("mm_projector_align.bin", "mm_projector_align.safetensors")
FULL_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")


def _refuse_phase1_folder(checkpoint: Path) -> None:
    """A phase-1 output folder (the artefact and a config, no model weights) given as a full checkpoint: said so,
    with the option that converts it (otherwise the tokenizer, then the weights, would be reported missing)."""
    artefacts = [name for name in PHASE1_ARTEFACT_NAMES if (checkpoint / name).is_file()]
    if artefacts and not any((checkpoint / name).is_file() for name in FULL_WEIGHT_NAMES):
        raise ConversionError(
            f"{checkpoint} is a phase-1 (pre-training) output ({artefacts[0]}: projector and alignment embeddings, no "
            f"language model): convert it with --pretrain-artefact {checkpoint / artefacts[0]} --language-model "
            "LLM --vision-tower TOWER."
        )


def _artefact_file(artefact: Path) -> Path:
    """The phase-1 artefact file: `artefact` itself, or the one inside a phase-1 output folder."""
    if artefact.is_dir():
        for name in PHASE1_ARTEFACT_NAMES:
            if (artefact / name).is_file():
                return artefact / name
        raise ConversionError(f"--pretrain-artefact {artefact}: no {' or '.join(PHASE1_ARTEFACT_NAMES)} in it.")
    if not artefact.is_file():
        raise ConversionError(f"--pretrain-artefact {artefact}: no such file.")
    return artefact


def load_pretrain_artefact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`mm_projector_align.bin` (or .safetensors) of phase 1: `mm_projector.*` and `align_indicators.indicator_embs`."""
    state_dict = map_original_state_dict(_load_weight_file(Path(path)))
    allowed = ("model.multi_modal_projector.", ALIGN_EMBEDDINGS_KEY)
    extra = sorted(key for key in state_dict if not key.startswith(allowed))
    if extra:
        raise ConversionError(
            f"{path} holds more than a phase-1 artefact (projector + alignment embeddings): {extra[:10]}"
        )
    if ALIGN_EMBEDDINGS_KEY not in state_dict:
        raise ConversionError(
            f"{path} has no align_indicators.indicator_embs: a LLaVA projector, not AlignGPT phase 1?"
        )
    return state_dict


def convert_pretrain_artefact(
    artefact: str | os.PathLike,
    language_model: str,
    vision_tower: str,
    output_dir: str | os.PathLike | None = None,
    *,
    vision_feature_layer: int | None = None,
    vision_select_feature: str | None = None,
    image_aspect_ratio: str | None = None,
    alignment_gate_hidden_size: int = 256,
    gate_text_scope: str = "conversation",
    dtype: str | torch.dtype = "auto",
    seed: int | None = 0,
    push_to_hub: str | None = None,
    private: bool | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    license: str | None = None,
):
    """Phase-1 artefact + a language model + a vision tower -> the starting point of instruction tuning.

    The projector and the alignment embeddings come from the artefact, the LLM (and its tokenizer) from
    `language_model`, the tower from `vision_tower`; the gate is freshly initialised (seeded by `seed`). Settings
    the artefact does not record (feature layer, feature selection, aspect ratio) are taken from a `config.json`
    next to the artefact when the original wrote one, else from the arguments (defaults: -2, `patch`, `pad`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    artefact, language_model, vision_tower = Path(artefact), str(language_model), str(vision_tower)
    artefact = _artefact_file(artefact)  # (a phase-1 output folder holds it)
    check_output_dir(output_dir, sources=[artefact.parent, language_model, vision_tower], overwrite=overwrite)
    sidecar = artefact.parent / "config.json"
    original_config = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if original_config:
        logger.info("Reading the phase-1 settings from %s", sidecar)
    if vision_feature_layer is None:
        vision_feature_layer = int(original_config.get("mm_vision_select_layer", -2))
    if vision_select_feature is None:
        vision_select_feature = original_config.get("mm_vision_select_feature", "patch")
    if image_aspect_ratio is None:
        # phase 2 of the original pads to square; phase 1 does not, so the sidecar's value is not used here
        image_aspect_ratio = "pad"
    torch_dtype = _torch_dtype(dtype, None) if dtype != "auto" else None

    mm_state_dict = load_pretrain_artefact(artefact)
    projector_type = _projector_type_from_keys(mm_state_dict)
    vision_config = load_vision_config(vision_tower)

    # the config first: a folder of another kind (the AlignGPT checkpoint, a vision tower) fails here, clearly
    try:
        llm_config = AutoConfig.from_pretrained(language_model)
    except ValueError as error:
        raise ConversionError(f"--language-model {language_model}: its config.json is not one transformers knows "
                              f"({str(error).splitlines()[0]}); expected a causal LM such as lmsys/vicuna-7b-v1.5.") from error
    if type(llm_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConversionError(
            f"--language-model {language_model} is not a causal language model (model_type "
            f"{llm_config.model_type!r}): expected the text-only LLM the phase-1 artefact was trained on (a folder or "
            "Hub id that AutoModelForCausalLM loads, e.g. lmsys/vicuna-7b-v1.5), not an AlignGPT checkpoint or a "
            "vision tower."
        )
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch_dtype or "auto")
    torch_dtype = torch_dtype or llm.dtype
    text_config = llm.config
    state_dict = {f"model.language_model.{k}": v for k, v in llm.get_decoder().state_dict().items()}
    if not text_config.tie_word_embeddings:
        state_dict[LM_HEAD_KEY] = llm.get_output_embeddings().weight.detach()
    del llm
    state_dict.update(mm_state_dict)
    state_dict.update(load_vision_tower_state_dict(vision_tower, vision_config, torch_dtype))

    tokenizer = load_tokenizer(language_model, config=text_config)
    vocab_size = max(len(tokenizer), state_dict[EMBED_KEY].shape[0])
    text_config.vocab_size = vocab_size
    resize_vocabulary(state_dict, vocab_size, bool(text_config.tie_word_embeddings))

    config = build_aligngpt_config(
        text_config,
        vision_config,
        projector_type=projector_type,
        vision_feature_layer=vision_feature_layer,
        vision_select_feature=vision_select_feature,
        num_alignment_levels=mm_state_dict[ALIGN_EMBEDDINGS_KEY].shape[0],
        alignment_gate_hidden_size=alignment_gate_hidden_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        alignment_token_id=tokenizer.convert_tokens_to_ids(ALIGNMENT_TOKEN),
        mm_hidden_size=original_config.get("mm_hidden_size"),
        gate_text_scope=gate_text_scope,
        multimodal_projector_bias="model.multi_modal_projector.linear_1.bias" in mm_state_dict,
    )
    projector_in = mm_state_dict["model.multi_modal_projector.linear_1.weight"].shape[1]
    if projector_in != vision_config.hidden_size:
        raise ConversionError(f"The projector reads width {projector_in} but the vision tower gives "
                              f"{vision_config.hidden_size}: wrong --vision-tower?")
    # the gate does not exist after phase 1: a fresh one, initialised like the model's own
    state_dict.update(fresh_gate_state_dict(config, seed))
    model = build_model_from_state_dict(config, state_dict, torch_dtype)

    image_processor = build_image_processor(vision_tower, image_aspect_ratio == "pad")
    generation_config = build_generation_config(language_model if os.path.isdir(language_model) else None,
                                                tokenizer, text_config)
    llm_id = next(iter(_hub_ids(language_model) or _hub_ids(getattr(text_config, "_name_or_path", None))), None)
    card_info = _card_facts(
        f"Built by `aligngpt convert` from an original AlignGPT phase-1 artefact (`{artefact}`: projector and "
        "alignment embeddings) with its language model and vision tower. **The alignment gate is freshly "
        "initialised** (phase 1 has none): instruction-tune this checkpoint (phase 2) before using it.",
        source=str(artefact), language_model=llm_id, vision_tower=next(iter(_hub_ids(vision_tower)), None),
        license=license,
    )
    return _finish(model, tokenizer, image_processor, generation_config, output_dir, push_to_hub, private,
                   max_shard_size, card_info, overwrite)


def fresh_gate_state_dict(config, seed: int | None = 0) -> dict[str, torch.Tensor]:
    """A newly initialised alignment gate (`nn.Linear` default init, like the original's `nn.Sequential`)."""
    from .modeling_aligngpt import AlignGPTAlignmentGate

    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        gate = AlignGPTAlignmentGate(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return {f"model.alignment_gate.{key}": value.detach() for key, value in gate.state_dict().items()}


def convert_original_sequence(
    input_ids: Sequence[int],
    labels: Sequence[int] | None = None,
    *,
    image_token_id: int,
    alignment_token_id: int,
    num_image_tokens: int,
    original_image_token_index: int = ORIGINAL_IMAGE_TOKEN_INDEX,
):
    """Original-format ids (`-200` where the image features go) -> this package's ids (and labels).

    The original runs `[bos, alignment vector, text, image features, text]` for a sample with an image, where the
    alignment vector is not in `input_ids`; here it is an `<align>` token after bos and the image is
    `num_image_tokens` `<image>` tokens, so the model sees a sequence of the same length. Labels get -100 at the
    inserted and expanded positions. Rows without an image are returned unchanged.
    """
    ids, new_labels = [], [] if labels is not None else None
    has_image = original_image_token_index in input_ids
    for position, token in enumerate(input_ids):
        label = labels[position] if labels is not None else None
        if token == original_image_token_index:
            ids.extend([image_token_id] * num_image_tokens)
            if new_labels is not None:
                new_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids.append(token)
            if new_labels is not None:
                new_labels.append(label)
        if position == 0 and has_image:  # the alignment slot sits right after bos
            ids.append(alignment_token_id)
            if new_labels is not None:
                new_labels.append(IGNORE_INDEX)
    return (ids, new_labels) if labels is not None else ids


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("source (one of)")
    source.add_argument("--checkpoint", help="folder of a full checkpoint of the original format")
    source.add_argument("--pretrain-artefact", "--pretrain-artifact", dest="pretrain_artefact",
                        help="phase-1 output mm_projector_align.bin (projector + alignment embeddings); needs "
                        "--language-model and --vision-tower, the gate is freshly initialised")
    parser.add_argument("--vision-tower", help="folder or Hub id of the CLIP vision tower (config, preprocessor "
                        "settings, and weights when the checkpoint has no copy); default: the config's "
                        "mm_vision_tower")
    parser.add_argument("--language-model", help="with --pretrain-artefact: folder or Hub id of the LLM (e.g. "
                        "lmsys/vicuna-7b-v1.5), its tokenizer is used too")
    parser.add_argument("--output", help="where to write the converted model and processor (a new or empty folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output, removing the weight files of an earlier run first")
    parser.add_argument("--license", default=None, metavar="ID",
                        help="Hub license id for the model card (default: llama2 when the config names a Vicuna v1.5 "
                        "/ Llama 2 base, as AlignGPT-7B/13B do; else none, and `aligngpt push` warns)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the converted weights (auto: the checkpoint's torch_dtype)")
    parser.add_argument("--gate-text-scope", default="conversation", choices=["conversation", "prompt"],
                        help="conversation (the original: in training the gate also averages the answer tokens) or "
                        "prompt (training sees the same gate input as inference)")
    parser.add_argument("--vision-feature-layer", type=int, default=None,
                        help="with --pretrain-artefact: vision layer feeding the projector (default -2)")
    parser.add_argument("--vision-select-feature", choices=list(SELECT_FEATURE_TO_STRATEGY), default=None,
                        help="with --pretrain-artefact: patch (drop CLS, default) or cls_patch")
    parser.add_argument("--image-aspect-ratio", choices=["pad", "square"], default=None,
                        help="with --pretrain-artefact: pad (pad to square first, default) or square")
    parser.add_argument("--gate-hidden-size", type=int, default=256,
                        help="with --pretrain-artefact: hidden width of the fresh gate (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="with --pretrain-artefact: seed of the fresh gate")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push model and processor to this Hub repo")
    parser.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size of the saved safetensors")


def add_convert_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers `convert` on an `argparse` sub-parser collection (`aligngpt convert ...`)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an original AlignGPT checkpoint (or a phase-1 artefact) to this package's format",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace):
    """`aligngpt convert`: input problems (and every ConversionError) are CommandErrors, which the command line
    reports as `aligngpt convert: error: ...` with exit status 2, without a traceback."""
    from .cli import CommandError, check_model_sources
    from .hub import HubPushError, check_repo_id

    check_model_sources(args, "--language-model", "--vision-tower")
    if bool(args.checkpoint) == bool(args.pretrain_artefact):
        raise CommandError("give exactly one of --checkpoint or --pretrain-artefact")
    if not args.output and not args.push_to_hub:
        raise CommandError("give --output and/or --push-to-hub")
    if args.pretrain_artefact and (not args.language_model or not args.vision_tower):
        raise CommandError("--pretrain-artefact needs --language-model and --vision-tower")
    if args.push_to_hub:
        try:
            check_repo_id(args.push_to_hub)
        except ValueError as error:
            raise CommandError(f"--push-to-hub {error}") from None
    common = dict(dtype=args.dtype, gate_text_scope=args.gate_text_scope, push_to_hub=args.push_to_hub,
                  private=args.private, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                  license=args.license)
    try:
        if args.checkpoint:
            model, _ = convert_checkpoint(args.checkpoint, args.vision_tower, args.output, **common)
        else:
            model, _ = convert_pretrain_artefact(
                args.pretrain_artefact, args.language_model, args.vision_tower, args.output,
                vision_feature_layer=args.vision_feature_layer, vision_select_feature=args.vision_select_feature,
                image_aspect_ratio=args.image_aspect_ratio, alignment_gate_hidden_size=args.gate_hidden_size,
                seed=args.seed, **common,
            )
    except ConversionError as error:
        raise CommandError(str(error)) from error
    except HubPushError as error:  # converted (and saved to --output), but the upload failed
        saved = f" (the converted model is in {args.output})" if args.output else ""
        raise CommandError(f"--push-to-hub: {error}{saved}") from error
    except OSError as error:  # a tower / LLM that is neither a folder here nor loadable from the Hub
        raise CommandError(f"cannot load a model it needs: {error}") from error
    where = " and ".join(x for x in (args.output, args.push_to_hub and f"hub:{args.push_to_hub}") if x)
    print(f"Converted AlignGPT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.dtype}) -> {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformers_aligngpt.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .cli import CommandError

    try:
        return run_convert(parser.parse_args(argv))
    except CommandError as error:
        parser.error(str(error))  # usage and `...: error: ...`, exit status 2, as `aligngpt convert`


__all__ = [
    "ConversionError",
    "check_output_dir",
    "convert_checkpoint",
    "convert_pretrain_artefact",
    "convert_original_sequence",
    "load_original_state_dict",
    "map_original_state_dict",
    "add_convert_subparser",
    "run_convert",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
