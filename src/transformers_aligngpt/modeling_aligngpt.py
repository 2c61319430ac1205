"""AlignGPT model: a LLaVA-style vision-language model with learned alignment levels.

Sequence layout (built by `AlignGPTProcessor`, never changed inside the model):

    [bos, <align>, system prompt, USER: , <image> x P, question, ASSISTANT: ...]

`<image>` positions receive the projected patch features and the `<align>` position receives the *alignment
vector*, both written into `inputs_embeds` by the base model. Everything multimodal happens in
`AlignGPTModel.forward`, so trainers that call the base model and the LM head separately (TRL) see the same thing
as `AlignGPTForConditionalGeneration.forward`.

The alignment vector of a row, with `E = alignment_embeddings.weight` of shape (N, hidden):
- pre-training: `E[alignment_levels[row]]`, the level of the pair's CLIP-score bucket;
- instruction tuning / inference (`alignment_mode="adaptive"`): `E[N-1] + w @ E[:N-1]` where
  `w = softmax(alignment_gate(d))` and `d[j] = <image feature j, mean text embedding of the row>`.
"""

import contextlib
import inspect
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import is_tracing, logging, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from .configuration_aligngpt import (
    ALIGNMENT_MODES,
    GATE_TEXT_SCOPES,
    AlignGPTConfig,
    check_fixed_alignment_level,
    unknown_choice,
)

logger = logging.get_logger(__name__)


@dataclass
class AlignGPTModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    alignment_weights (`torch.FloatTensor` of shape `(batch_size, num_alignment_levels - 1)`, *optional*):
        The gate's weights over the local alignment levels `0..N-2`, one row per sample (zeros for rows without an
        image). Only set when the gate ran (`alignment_mode` `adaptive` or `local`, no `alignment_levels` given).
    """

    alignment_weights: torch.FloatTensor | None = None


@dataclass
class AlignGPTCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    alignment_weights (`torch.FloatTensor` of shape `(batch_size, num_alignment_levels - 1)`, *optional*):
        The gate's weights over the local alignment levels, see [`AlignGPTModelOutputWithPast`].
    """

    alignment_weights: torch.FloatTensor | None = None


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `tensor.to(dtype)` when it converts: a no-op `.to()` still goes through the dispatcher (~1 us of host time, which
    # at batch 1 on a GPU is forward time; the eager alignment path would pay it five times)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _config_field(config, name: str):
    # `config.<name>` without `PreTrainedConfig.__getattribute__`, which looks `name` up in `attribute_map` on every
    # read (~2 us each, several times that with cold caches; the eager forward reads five fields per call). Only for
    # fields that `attribute_map` does not alias: AlignGPTConfig aliases none. (Dynamo cannot trace the bypass, and
    # reads config fields at compile time anyway.)
    if torch.compiler.is_compiling():
        return getattr(config, name)
    return object.__getattribute__(config, name)


def _padding_mask(attention_mask) -> torch.Tensor | None:
    """The (batch, seq) padding mask the gate reads, or None when `attention_mask` is not one: a 4D mask, or the dict
    of per-layer masks that `generate` builds beforehand with a compileable (static) cache for LMs with `layer_types`
    (Qwen2, Gemma2). With left padding (generation) the pads come before `<align>`, so the gate never reads them."""
    return attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None


def _is_dispatched(module: nn.Module) -> bool:
    """Whether accelerate's big-model hooks manage `module` (a `device_map` dispatch): an offloaded module's weights
    are then only materialised inside its own forward, so it must be called, not read."""
    # (an instance attribute that accelerate sets: a dict lookup, where getattr would go through Module.__getattr__ and
    # its AttributeError on every forward)
    return module.__dict__.get("_hf_hook") is not None


def _features_like(image_features, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Projected image features, a tensor or a per-image list (`mm_encoder_outputs`), as one (num_images, P, hidden)
    tensor on the embeddings' device and in their dtype."""
    if isinstance(image_features, (list, tuple)):
        image_features = torch.stack(list(image_features))
    return image_features.to(inputs_embeds.device, inputs_embeds.dtype)


@dataclass
class PlaceholderLayout:
    """Where a batch's placeholders are, as the forward needs it ([`AlignGPTModel.locate_placeholders`]).

    image_mask, align_mask: (batch, seq) on the device; None where `spans` makes them unnecessary.
    gate_text: (batch, seq), the tokens the gate averages (in the embeddings' dtype when made on the host); None
        when the gate does not run.
    gate_text_counts: their per-row counts, on the host; None when they were not copied there.
    spans: one row whose images are each P consecutive tokens: `(position, image index)` of every placeholder run in
        order, -1 for `<align>`. The merge is then one `torch.cat` of slices (one kernel) instead of `masked_scatter`
        (a clone, a prefix sum and a scatter) and a `where`.
    gate_text_runs: with `spans`, when no mask cuts the text after `<align>`: the gate's text tokens as `[start, end)`
        runs of positions (the gaps between the image runs), in place of `gate_text`. Their mean is then that of a
        `cat` of those slices, with no 0/1 vector built on the host and copied to the device.
    """

    image_mask: torch.BoolTensor | None
    align_mask: torch.BoolTensor | None
    gate_text: torch.Tensor | None = None
    gate_text_counts: list | None = None
    spans: list | None = None
    gate_text_runs: list | None = None


class AlignGPTMultiModalProjector(nn.Module):
    """`mlp2x_gelu` (Linear, GELU, Linear) or `linear` (one Linear): vision width -> LM width."""

    def __init__(self, config: AlignGPTConfig):
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        in_features = config.vision_config.hidden_size * layers
        out_features = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(out_features, out_features, bias=bias)
        else:
            self.act = self.linear_2 = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        # the projector may be kept in fp32 beside an fp16 tower (`_keep_in_fp32_modules`)
        hidden_states = self.linear_1(image_features.to(self.linear_1.weight.dtype))
        if self.linear_2 is not None:
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class AlignGPTAlignmentGate(nn.Module):
    """Maps the P image-text affinities `d` of one image to logits over the N-1 local alignment levels.

    Its input width is the number of image features per image (`config.num_image_tokens`): the gate reads the
    affinity of every patch *position*, which is why it is tied to the vision config.
    """

    def __init__(self, config: AlignGPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.num_image_tokens, config.alignment_gate_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.alignment_gate_hidden_size, config.num_alignment_levels - 1)

    def forward(self, affinities: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(affinities)))


class AlignGPTPreTrainedModel(PreTrainedModel):
    config: AlignGPTConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AlignGPTModel):
            # as the original: Xavier-uniform alignment embeddings
            init.xavier_uniform_(module.alignment_embeddings.weight)


class AlignGPTModel(AlignGPTPreTrainedModel):
    """Vision tower + projector + alignment embeddings and gate + language model, without the LM head."""

    # never quantised by bitsandbytes & co. (they skip `_keep_in_fp32_modules`; fp16 loading keeps them in fp32): the
    # small modules that phase 2 trains fully (PEFT `modules_to_save`) and the alignment table
    _keep_in_fp32_modules = ["multi_modal_projector", "alignment_embeddings", "alignment_gate"]

    def __init__(self, config: AlignGPTConfig):
        super().__init__(config)
        config.validate_alignment()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = AlignGPTMultiModalProjector(config)
        # an nn.Embedding (not a bare Parameter) so that PEFT's modules_to_save and device_map handle it
        self.alignment_embeddings = nn.Embedding(config.num_alignment_levels, config.text_config.hidden_size)
        self.alignment_gate = AlignGPTAlignmentGate(config)
        self.language_model = AutoModel.from_config(config.text_config)
        # Read once, as the modules' widths are: each config read goes through PreTrainedConfig.__getattribute__
        # (~1 us, ~8 us for the property), and at batch 1 on a GPU host time before the LLM starts is forward time.
        self.num_image_tokens = config.num_image_tokens  # P, the gate's input width
        vision_config = config.vision_config
        self.pixel_values_shape = (
            getattr(vision_config, "num_channels", 3), vision_config.image_size, vision_config.image_size
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Runs the tower and the projector. `pooler_output`: (num_images, num_image_tokens, hidden)."""
        kwargs.pop("return_dict", None)
        # A frozen tower (both AlignGPT phases freeze it) runs without autograd: no graph kept, no recompute under
        # activation checkpointing (transformers skips it without gradients) and no backward, even where PEFT / TRL
        # made its patch embeddings require gradients (`enable_input_require_grads` hooks every sub-model's input
        # embeddings). Looked at only when gradients are on, so inference pays nothing for the check.
        frozen = (
            torch.is_grad_enabled()
            and not pixel_values.requires_grad
            and not any(parameter.requires_grad for parameter in self.vision_tower.parameters())
        )
        with torch.no_grad() if frozen else contextlib.nullcontext():
            image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
        selected = [image_outputs.hidden_states[layer] for layer in layers]
        if vision_feature_select_strategy == "default":
            selected = [hidden[:, 1:] for hidden in selected]
        image_outputs.pooler_output = self.multi_modal_projector(torch.cat(selected, dim=-1))
        return image_outputs

    def _is_distributed_training(self) -> bool:
        return (
            self.training
            and torch.is_grad_enabled()
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )

    def _blank_image_branch(
        self, inputs_embeds, alignment_levels, vision_feature_layer, vision_feature_select_strategy
    ) -> torch.Tensor:
        """0 x the image branch (tower, projector, then the gate or the alignment table as a batch with images would
        use them) run on one blank image: a scalar zero that keeps those modules in the forward and backward."""
        vision_config = self.config.vision_config
        size = vision_config.image_size
        pixel_values = torch.zeros(
            1, getattr(vision_config, "num_channels", 3), size, size,
            device=inputs_embeds.device, dtype=self.vision_tower.dtype,
        )
        features = self.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        features = _features_like(features, inputs_embeds)  # (1, P, hidden)
        # one row: <align>, the P image placeholders, one text token
        blank = features.new_zeros(1, 1, features.shape[-1])
        embeds = torch.cat([blank, features, blank], dim=1)
        image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        image_mask[:, 1:-1] = True
        align_mask = torch.zeros_like(image_mask)
        align_mask[:, 0] = True
        levels = None if alignment_levels is None else alignment_levels.new_zeros(1)
        vectors, _ = self.compute_alignment_vectors(features, embeds, image_mask, align_mask, None, levels, None)
        return (features.sum() + vectors.sum()).to(inputs_embeds.dtype) * 0

    def get_placeholder_masks(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> tuple[torch.BoolTensor, torch.BoolTensor]:
        """(batch, seq) masks of the `<image>` and `<align>` placeholders, from the ids or from the embeddings."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id, input_ids == self.config.alignment_token_id
        ids = torch.tensor(
            [self.config.image_token_id, self.config.alignment_token_id], device=inputs_embeds.device
        )
        placeholder_embeds = self.get_input_embeddings()(ids)
        distinct = (placeholder_embeds[0] != placeholder_embeds[1]).any()
        message = (
            "The <image> and <align> rows of the input embeddings are identical, so the placeholders cannot be told "
            "apart in inputs_embeds: pass input_ids instead, or give the two rows distinct values."
        )
        if is_tracing():
            torch_compilable_check(distinct, message)
        elif not distinct:
            raise ValueError(message)
        image_mask = (inputs_embeds == placeholder_embeds[0]).all(-1)
        align_mask = (inputs_embeds == placeholder_embeds[1]).all(-1)
        return image_mask, align_mask

    def check_pixel_values(self, pixel_values: torch.Tensor):
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.pixel_values_shape:
            channels, size, _ = self.pixel_values_shape
            raise ValueError(
                f"pixel_values must have shape (num_images, {channels}, {size}, {size}) for this vision tower, got "
                f"{tuple(pixel_values.shape)}. Preprocess images with the model's AlignGPTProcessor."
            )

    def _placeholder_messages(self, num_images, num_patches) -> tuple[str, str, str]:
        levels = self.config.num_alignment_levels
        count_message = (
            "The number of <image> placeholder tokens does not match the images: {found} <image> tokens for "
            f"{num_images} images, which need {num_images} x {num_patches}. Build inputs with AlignGPTProcessor "
            "(one <image> per image in the text) and make sure truncation does not cut them. Generated text fed back "
            "must hold no <image>: set `model.config.suppress_placeholder_logits = True` so that it never does."
        )
        align_message = (
            "Each row with an image needs exactly one <align> token (AlignGPTProcessor puts it right after bos) and "
            "rows without an image none{rows}. If the text was truncated from the left, it may have cut <align>: "
            "truncate from the right or raise max_length. If the ids hold generated text, the model generated a "
            "placeholder: set `model.config.suppress_placeholder_logits = True` so that it never does."
        )
        level_message = (
            f"alignment_levels must lie in 0..{levels - 1} in rows with an image; bucket the CLIP scores with "
            f"`assign_levels(scores, num_levels={levels})`{{found}}."
        )
        return count_message, align_message, level_message

    def _check_counts(self, image_tokens: list, align_tokens: list, levels: list | None, num_images, num_patches):
        """The placeholder checks in Python, on per-row counts already on the host (messages built only on failure:
        this runs in every forward)."""
        if sum(image_tokens) != num_images * num_patches:
            count_message = self._placeholder_messages(num_images, num_patches)[0]
            raise ValueError(count_message.format(found=sum(image_tokens)))
        bad_rows = [row for row, (images, aligns) in enumerate(zip(image_tokens, align_tokens))
                    if aligns != (images > 0)]
        if bad_rows:
            align_message = self._placeholder_messages(num_images, num_patches)[1]
            raise ValueError(align_message.format(rows=f" (rows {bad_rows[:8]} break this)"))
        if levels is not None:  # (read only in rows with an image, i.e. an <align>: others may hold anything, e.g. -1)
            num_levels = self.config.num_alignment_levels
            bad_levels = sorted({v for v, aligns in zip(levels, align_tokens) if aligns and not 0 <= v < num_levels})
            if bad_levels:
                level_message = self._placeholder_messages(num_images, num_patches)[2]
                raise ValueError(level_message.format(found=f", got {bad_levels[:8]}"))

    def _check_level_count(self, alignment_levels, batch_size):
        if alignment_levels is None:
            return
        if not isinstance(alignment_levels, torch.Tensor) or alignment_levels.is_floating_point() or (
            alignment_levels.dtype in (torch.bool, torch.complex64, torch.complex128)
        ):
            found = alignment_levels.dtype if isinstance(alignment_levels, torch.Tensor) else type(alignment_levels)
            raise TypeError(
                f"alignment_levels must be an integer tensor (torch.long) with one level per row, got {found}: "
                "`torch.tensor(levels, dtype=torch.long)`."
            )
        if alignment_levels.numel() != batch_size:
            raise ValueError(
                f"alignment_levels needs one level per row ({batch_size}), got {alignment_levels.numel()}."
            )

    def check_placeholders(
        self, image_mask, align_mask, num_images, num_patches, alignment_levels, gate_text=None
    ) -> list | None:
        """Placeholder counts against the images, exactly one `<align>` in each image row and none elsewhere, and the
        alignment levels' range, from the masks on the device. Eager: one small device-to-host copy and the checks in
        Python; traced (torch.compile / export): `torch_compilable_check`s, which are also the compiler's hints.
        (The eager forward with `input_ids` uses [`placeholders_on_host`] instead, which needs fewer device ops.)

        `gate_text` ((batch, seq), from [`gate_text_tokens`]) rides along in the same copy: the per-row number of
        tokens the gate averages is returned (a list), so that the text mean needs no reduction on the device.
        None when nothing was copied (traced, checks disabled, or no `gate_text`)."""
        self._check_level_count(alignment_levels, image_mask.shape[0])
        if is_tracing():  # (no host copy, so no text counts either)
            count_message, align_message, level_message = self._placeholder_messages(num_images, num_patches)
            image_tokens = image_mask.sum(-1)
            torch_compilable_check(
                image_tokens.sum() == num_images * num_patches, count_message.format(found="a different number of")
            )
            torch_compilable_check((align_mask.sum(-1) == (image_tokens > 0)).all(), align_message.format(rows=""))
            if alignment_levels is not None:
                levels, has_align = self.config.num_alignment_levels, align_mask.any(-1)
                in_range = (alignment_levels.view(-1) >= 0) & (alignment_levels.view(-1) < levels)
                torch_compilable_check((in_range | ~has_align).all(), level_message.format(found=""))
            return None
        if not self._host_checks_enabled():
            return None
        # per-row counts (and levels, or the gate's text tokens) to the host in one copy: fewer kernels than
        # reducing them on the device (stack promotes the masks to a common dtype)
        counts = torch.stack([image_mask, align_mask] + ([gate_text] if gate_text is not None else [])).sum(-1)
        if alignment_levels is not None:
            counts = torch.cat([counts, alignment_levels.view(1, -1).to(counts.device, counts.dtype)])
        counts = counts.tolist()
        self._check_counts(
            counts[0], counts[1], counts[-1] if alignment_levels is not None else None, num_images, num_patches
        )
        return counts[2] if gate_text is not None else None

    def locate_placeholders(
        self, input_ids, inputs_embeds, attention_mask, gate_text_mask, alignment_levels, num_images, num_patches,
        gate_runs, prompt_length=None,
    ) -> PlaceholderLayout:
        """The placeholders' [`PlaceholderLayout`], after the placeholder checks: on the host with
        [`placeholders_on_host`] in eager mode with `input_ids`, else on the device ([`get_placeholder_masks`],
        [`gate_text_tokens`], [`check_placeholders`]). With `prompt_length` (shorter than the sequence), placeholder
        ids after the prompt are ordinary tokens: the candidates that assisted decoding appends to the prompt in its
        first forward, copied from the prompt by prompt lookup."""
        if input_ids is not None and not is_tracing() and self._host_checks_enabled():
            return self.placeholders_on_host(
                input_ids, attention_mask, gate_text_mask, alignment_levels, num_images, num_patches, gate_runs,
                inputs_embeds.dtype, prompt_length,
            )
        image_mask, align_mask = self.get_placeholder_masks(input_ids, inputs_embeds)
        if prompt_length is not None:
            in_prompt = torch.arange(image_mask.shape[1], device=image_mask.device) < prompt_length
            image_mask, align_mask = image_mask & in_prompt, align_mask & in_prompt
        gate_text = self.gate_text_tokens(image_mask, align_mask, attention_mask, gate_text_mask) if gate_runs else None
        gate_text_counts = self.check_placeholders(
            image_mask, align_mask, num_images, num_patches, alignment_levels, gate_text
        )
        return PlaceholderLayout(image_mask, align_mask, gate_text, gate_text_counts)

    @staticmethod
    def _host_checks_enabled() -> bool:
        # transformers' switch for sync-free checks: no host copy at all
        return os.getenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "0") != "1"

    def placeholders_on_host(
        self, input_ids, attention_mask, gate_text_mask, alignment_levels, num_images, num_patches, gate_runs, dtype,
        prompt_length=None,
    ) -> PlaceholderLayout:
        """The eager forward's placeholder bookkeeping, done on the CPU: the [`PlaceholderLayout`] that
        [`get_placeholder_masks`], [`gate_text_tokens`] and [`check_placeholders`] give on the device, with
        `gate_text` already in `dtype`, and `spans` (and, when no mask cuts the text, `gate_text_runs` in place of
        `gate_text`) for one row whose images are runs of P tokens.

        Why on the host: at batch 1 a GPU runs the CLIP tower's kernels faster than Python launches them, so the small
        ops between the tower and the LLM start on an idle GPU and each costs its launch (~25 us on an H100 host),
        whatever its arithmetic. Here the ids (and the 2D masks the gate reads) come over, which the checks need
        anyway; masks, counts, checks, the gate's text tokens and the spans are a few NumPy ops on
        (batch, seq) integers (each ~1 us, against ~5 us for a torch op on the CPU, and every microsecond of host
        time before the LLM is a microsecond of an idle GPU); the gate's tokens go back in one copy, and the masks in
        another only when the merge needs them (several rows). One row: 2 device ops (the copies over of the ids and
        the attention mask; a third, the gate's tokens back, only when a mask cuts the text) where the device path
        takes 10, and the merge is one `cat` instead of `masked_scatter` + `where`."""
        self._check_level_count(alignment_levels, input_ids.shape[0])
        # the 2D masks the gate reads come over with the ids (2D padding masks are 0/1; read as bool, as
        # transformers does)
        gate_masks = []
        if gate_runs:
            gate_masks = [_padding_mask(attention_mask), gate_text_mask]
        # One plain copy each (ids + attention mask on an H100 / H200 host: 42-60 us as two copies, 53-91 us as a
        # device `stack` + one copy: a kernel's launch and wait cost more than a second transfer of a few KB), kept as
        # separate (batch, seq) arrays (stacking them on the host is one more NumPy call).
        ids = input_ids.cpu().numpy()
        if prompt_length is not None:  # (placeholder ids after the prompt are tokens: see locate_placeholders)
            ids = ids.copy()
            ids[:, prompt_length:] = -1
        # (padding, gate_text_mask), each None or a (batch, seq) array, bool or 0/1
        masks = [None if mask is None else (mask != 0 if mask.is_floating_point() else mask).cpu().numpy()
                 for mask in gate_masks]
        levels = None if alignment_levels is None else alignment_levels.view(-1).tolist()
        config = self.config
        image_id, align_id = _config_field(config, "image_token_id"), _config_field(config, "alignment_token_id")
        image_mask = align_mask = spans = text = runs = None
        one_row = ids.shape[0] == 1
        if one_row:
            # One row (generation's batch-1 forward): the placeholders' positions instead of (batch, seq) masks. Half
            # the NumPy calls of the masks' way, and their host time halves with them (in a forward each NumPy call
            # follows other work that has filled the caches, and costs several times its warm ~1 us).
            image_positions = np.flatnonzero(ids[0] == image_id)
            align_positions = np.flatnonzero(ids[0] == align_id)
            self._check_counts([image_positions.size], [align_positions.size], levels, num_images, num_patches)
            spans = self._one_row_spans(image_positions, align_positions, num_patches)
            if gate_runs:
                runs = self._one_row_text_runs(
                    spans, [mask[0] for mask in masks if mask is not None], ids.shape[1], num_patches
                )
        # the masks' way: several rows, or one row whose merge scatters by mask (images not each one run) or whose
        # text a mask cuts (the gate's tokens as a 0/1 vector)
        if not one_row or spans is None or (gate_runs and runs is None):
            image_mask = ids == image_id  # (batch, seq) NumPy bools from here on
            align_mask = ids == align_id
            if not one_row:
                self._check_counts(
                    image_mask.sum(-1).tolist(), align_mask.sum(-1).tolist(), levels, num_images, num_patches
                )
            if gate_runs and runs is None:
                text = self._text_after_align(image_mask, align_mask, *masks)
        layout = PlaceholderLayout(None, None, spans=spans)
        if runs is not None:
            layout.gate_text_runs = runs
            layout.gate_text_counts = [sum(end - start for start, end in runs)]
        if text is None and spans is not None:
            return layout
        # (non_blocking on CUDA: a blocking host-to-device copy also waits for the stream; from pageable memory the
        # driver has read the source before the call returns, so nothing here can change under the copy)
        device = input_ids.device
        non_blocking = device.type == "cuda"
        if text is not None:
            layout.gate_text_counts = text.sum(-1).tolist()
            # (cast on the CPU, where it is a memcpy-sized loop, not a device kernel)
            layout.gate_text = _in_dtype(torch.from_numpy(text), dtype).to(device, non_blocking=non_blocking)
        if spans is None:  # (with spans nothing reads the masks: the one-row gate has its text tokens)
            placeholder_masks = torch.from_numpy(np.stack([image_mask, align_mask]))
            placeholder_masks = placeholder_masks.to(device, non_blocking=non_blocking)
            layout.image_mask, layout.align_mask = placeholder_masks[0], placeholder_masks[1]  # two (batch, seq) views
        return layout

    @staticmethod
    def _one_row_spans(image_positions, align_positions, num_patches: int) -> list | None:
        """[`PlaceholderLayout.spans`] of a one-row batch from its sorted `<image>` and `<align>` positions (NumPy,
        after the checks) when its images each take `num_patches` consecutive tokens; None otherwise (the merge then
        scatters by mask)."""
        if image_positions.size == 0:
            return None
        starts = image_positions[::num_patches].tolist()
        ends = image_positions[num_patches - 1 :: num_patches].tolist()
        # num_patches sorted positions spanning num_patches - 1 are consecutive (a Python loop over the images of one
        # row: a few ints, cheaper than NumPy calls)
        if any(end - start != num_patches - 1 for start, end in zip(starts, ends)):
            return None
        align_position = int(align_positions[0])  # (the row's one <align>: checked)
        return sorted([(align_position, -1)] + [(start, image) for image, start in enumerate(starts)])

    @staticmethod
    def _one_row_text_runs(spans, masks, seq_len: int, num_patches: int) -> list | None:
        """[`gate_text_tokens`]'s rule for one row as `[start, end)` runs of positions, from its `spans` (after the
        checks): everything after `<align>` but the image runs, when none of `masks` (each (seq,), bool or 0/1) has a
        0 there.
        None when that does not hold (no spans, or a padding / prompt mask that cuts the text): the caller then builds
        the 0/1 vector. A few Python ints, where the vector takes several NumPy calls, a cast and a device copy."""
        if spans is None:
            return None
        first = next(position for position, image in spans if image < 0) + 1  # right after <align>
        if not all(mask[first:].all() for mask in masks):
            return None
        runs, cursor = [], first
        for start, image in spans:
            if image >= 0 and start + num_patches > cursor:  # (an image before <align> is not text either way)
                if start > cursor:
                    runs.append((cursor, start))
                cursor = start + num_patches
        if cursor < seq_len:
            runs.append((cursor, seq_len))
        return runs

    def merge_placeholders(self, inputs_embeds, image_features, alignment_vectors, layout: PlaceholderLayout):
        """`inputs_embeds` with the image features at the `<image>` placeholders (in order) and each row's alignment
        vector at its `<align>`. (batch, seq, hidden), image_features (num_images, P, hidden), vectors (batch, hidden).
        """
        vectors = _in_dtype(alignment_vectors, inputs_embeds.dtype)
        if layout.spans is not None:  # one row: the embeddings between the placeholders, and what fills them
            pieces, cursor = [], 0
            num_patches = image_features.shape[1]
            for position, image in layout.spans:
                pieces.append(inputs_embeds[:, cursor:position])
                if image < 0:
                    pieces.append(vectors.view(1, 1, -1))
                    cursor = position + 1
                else:
                    pieces.append(image_features[image : image + 1])
                    cursor = position + num_patches
            pieces.append(inputs_embeds[:, cursor:])
            return torch.cat(pieces, dim=1)
        inputs_embeds = inputs_embeds.masked_scatter(layout.image_mask.unsqueeze(-1), image_features)
        # Each row's vector goes to that row's own <align> position, whichever rows carry one: a `where` over the
        # batch, as masked_scatter would take the vectors in the order of the rows that have one.
        return torch.where(layout.align_mask.unsqueeze(-1), vectors.unsqueeze(1), inputs_embeds)

    @staticmethod
    def _prompt_length(gate_prompt_length, seq_len: int) -> int | None:
        """`gate_prompt_length` checked, or None when it is absent or the prompt is the whole sequence (a prefill:
        nothing to cut, no device op)."""
        if gate_prompt_length is None:
            return None
        if isinstance(gate_prompt_length, bool) or not isinstance(gate_prompt_length, (int, np.integer)):
            raise TypeError(
                f"gate_prompt_length must be an int (the prompt's length in tokens), got {gate_prompt_length!r}."
            )
        if gate_prompt_length < 1:
            raise ValueError(f"gate_prompt_length must be at least 1, got {gate_prompt_length}.")
        return int(gate_prompt_length) if gate_prompt_length < seq_len else None

    @staticmethod
    def _prompt_padding_mask(attention_mask, prompt_length: int, inputs_embeds):
        """The 2D padding mask (batch, seq) with the positions from `prompt_length` on masked out."""
        batch_size, seq_len = inputs_embeds.shape[:2]
        in_prompt = (torch.arange(seq_len, device=inputs_embeds.device) < prompt_length).expand(batch_size, -1)
        padding = _padding_mask(attention_mask)
        return in_prompt if padding is None else in_prompt & (padding != 0)

    @staticmethod
    def gate_text_tokens(image_mask, align_mask, attention_mask, gate_text_mask) -> torch.Tensor:
        """(batch, seq), 1 where the gate reads a text token: attended tokens after `<align>` (so bos and left padding
        are out) that are not image placeholders, restricted to `gate_text_mask` when given (except in a row where it
        leaves no text: see [`_text_after_align`]). Bool or integer, never floating point: its row sums are exact
        counts (a bf16 sum of 0/1 values stops being exact above 256)."""
        # 2D padding masks are 0/1 (transformers reads them as bool too)
        masks = [
            None if mask is None else (mask != 0 if mask.is_floating_point() else mask)
            for mask in (_padding_mask(attention_mask), gate_text_mask)
        ]
        return AlignGPTModel._text_after_align(image_mask, align_mask, *masks)

    @staticmethod
    def _text_after_align(image_mask, align_mask, padding_mask, gate_text_mask):
        """[`gate_text_tokens`]'s rule on (batch, seq) torch tensors or NumPy arrays, the masks None, bool or 0/1.

        A row whose text `gate_text_mask` removes entirely keeps all its text instead: that mask came from labels
        that supervise the whole row (LLaVA-style `labels = input_ids.clone()`), which leave no prompt, and a gate
        reading nothing would give every such row the same constant mix (and its first layer no gradient). The row
        then reads what it reads without labels; the host path warns."""
        after_align = align_mask.cumsum(-1) > align_mask  # 0 > 0 before <align>, 1 > 1 at it, 1 > 0 after it
        text = after_align > image_mask  # after <align> and not an image placeholder
        if padding_mask is not None:
            text = text * padding_mask
        if gate_text_mask is None:
            return text
        prompt_text = text * gate_text_mask
        emptied = (~prompt_text.any(-1) & text.any(-1))[:, None]  # (batch, 1): rows the mask left without text
        on_host = isinstance(text, np.ndarray)
        if on_host and not emptied.any():  # (the usual case: nothing to swap)
            return prompt_text
        if on_host:
            logger.warning_once(
                "gate_text_mask (labels == -100 when not given) leaves a row with an image no text for the gate: its "
                "labels supervise every text token, so there is no prompt to tell the gate what the instruction is. "
                "The gate reads the whole row's text there, as without labels. Set the prompt's labels to -100 "
                "(supervise only the answers, as the package's collators do) or pass gate_text_mask."
            )
        return (np.where if on_host else torch.where)(emptied, text, prompt_text)

    def _alignment_table(self, device) -> torch.Tensor:
        """`E`, the (N, hidden) alignment table. Read as the weight itself, except when accelerate offloads the module
        (`device_map` with "cpu" beside a GPU, or "disk"): its weight then stays on the meta device outside the
        module's own forward, so the table comes from calling the module on every level."""
        embeddings = self.alignment_embeddings
        if _is_dispatched(embeddings):
            return embeddings(torch.arange(embeddings.num_embeddings, device=device))
        return embeddings.weight

    def compute_alignment_vectors(
        self,
        image_features: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_mask: torch.BoolTensor,
        align_mask: torch.BoolTensor,
        attention_mask: torch.Tensor | None,
        alignment_levels: torch.LongTensor | None,
        gate_text_mask: torch.BoolTensor | None,
        gate_text: torch.Tensor | None = None,
        gate_text_counts: list | None = None,
        gate_text_runs: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One alignment vector per row, (batch, hidden), and the gate weights (batch, N-1) when the gate ran.

        Args:
            image_features: (num_images, P, hidden), the projected features in placeholder order.
            inputs_embeds: (batch, seq, hidden), token embeddings *before* the placeholders are filled.
            gate_text, gate_text_counts: [`gate_text_tokens`] and its per-row sums on the host, when the forward
                computed them already (see [`check_placeholders`]).
            gate_text_runs: one row: those tokens as `[start, end)` runs of positions instead of `gate_text` (see
                [`PlaceholderLayout`]).
        """
        embeddings = self.alignment_embeddings
        num_local = embeddings.num_embeddings - 1
        if alignment_levels is not None:
            # pre-training: the pair's own level. Rows without an image may hold any value (checked only in image
            # rows): clamped, they read some level whose vector is never used. (An offloaded module's hook moves
            # the ids to where it computes.)
            device = inputs_embeds.device if _is_dispatched(embeddings) else embeddings.weight.device
            return embeddings(alignment_levels.to(device).view(-1).clamp(0, num_local)), None
        table = self._alignment_table(inputs_embeds.device)  # (N, hidden)

        batch_size = inputs_embeds.shape[0]
        # (the config may have been edited since the model was built: a mode, or a level, is checked where it is read)
        mode = _config_field(self.config, "alignment_mode")
        if mode not in ("adaptive", "local"):
            if mode == "global":
                return table[num_local].expand(batch_size, -1), None
            if mode == "mean":
                return (table[num_local] + table[:num_local].mean(0)).expand(batch_size, -1), None
            if mode == "fixed":
                level = check_fixed_alignment_level(self.config.fixed_alignment_level, num_local + 1)
                return table[level].expand(batch_size, -1), None
            raise unknown_choice("alignment_mode", mode, ALIGNMENT_MODES)

        # adaptive / local: the gate reads d = <image feature j, mean text embedding of the row> (text: see
        # `gate_text_tokens`). (Each line is one or two small kernels: in eager mode on a GPU every op costs a launch,
        # so they are few.)
        num_images, num_patches = image_features.shape[:2]
        # one row (the batch-1 forward of generation): every image is that row's, no image->row map needed
        one_row = batch_size == 1 and num_images > 0
        if one_row and gate_text_runs is not None:  # the text tokens as runs of positions: the mean of their slices
            pieces = [inputs_embeds[:, start:end] for start, end in gate_text_runs]
            if not pieces:  # (no text after <align>: a zero mean, as the masked mean below gives)
                text_mean = inputs_embeds.new_zeros(1, inputs_embeds.shape[-1])
            else:
                text_mean = (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]).mean(1)
        else:
            if gate_text is None:
                gate_text = self.gate_text_tokens(image_mask, align_mask, attention_mask, gate_text_mask)
            weights = _in_dtype(gate_text, inputs_embeds.dtype)  # (the host path's is in that dtype already)
            # the masked mean as one batched matmul, without a (batch, seq, hidden) temporary; with the row's token
            # count already on the host, the division is the matmul's `alpha` (2 kernels fewer)
            if one_row and gate_text_counts is not None:
                ignored = inputs_embeds.detach()[:, :1]  # (beta=0: baddbmm's `input` is not read; out of autograd)
                text_mean = torch.baddbmm(
                    ignored, weights.unsqueeze(1), inputs_embeds, beta=0, alpha=1 / max(gate_text_counts[0], 1)
                ).squeeze(1)
            else:
                text_sum = torch.bmm(weights.unsqueeze(1), inputs_embeds).squeeze(1)
                text_mean = text_sum / weights.sum(-1, keepdim=True).clamp(min=1)
        # text_mean: (batch, hidden), in the dtype of the embeddings, which is the image features'

        gate = self.alignment_gate
        if one_row:
            affinities = image_features @ text_mean[0]  # (I, P)
        else:
            # Which row each image belongs to, without a Python loop: images are laid out in placeholder order,
            # P placeholders each, so the running count of images per row locates them (static shapes).
            images_per_row = image_mask.sum(-1) // num_patches  # (batch,)
            row_of_image = torch.searchsorted(
                images_per_row.cumsum(0), torch.arange(num_images, device=images_per_row.device), right=True
            ).clamp(max=batch_size - 1)
            affinities = torch.bmm(image_features, text_mean[row_of_image].unsqueeze(-1)).squeeze(-1)  # (I, P)
        # in the gate's dtype, which is the table's (both kept in fp32, or both in the model's dtype), so the mix needs
        # no cast: the softmax kernels accumulate in fp32 whatever the dtype
        image_weights = torch.softmax(gate(_in_dtype(affinities, gate.fc1.weight.dtype)), dim=-1)
        # Several images in one row: each image gets its own weights, the row's one <align> token uses their mean.
        if one_row:
            row_weights = image_weights if num_images == 1 else image_weights.mean(0, keepdim=True)
        else:
            row_weights = torch.zeros(batch_size, num_local, device=image_weights.device, dtype=image_weights.dtype)
            row_weights.index_add_(0, row_of_image, image_weights)
            row_weights = row_weights / images_per_row.clamp(min=1).unsqueeze(-1)

        mix = _in_dtype(row_weights, table.dtype)
        if mode == "local":
            return mix @ table[:num_local], row_weights
        return torch.addmm(table[num_local], mix, table[:num_local]), row_weights  # E[N-1] + w @ E[:N-1]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # (the old name would pass through **kwargs)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        alignment_levels: torch.LongTensor | None = None,
        gate_text_mask: torch.BoolTensor | None = None,
        gate_prompt_length: int | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> AlignGPTModelOutputWithPast:
        r"""
        alignment_levels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Alignment level (0..N-1) of each row's image-text pair, for pre-training. Read only for rows that carry
            an `<align>` token. Without it, the alignment vector follows `config.alignment_mode`.
        gate_text_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            With `config.gate_text_scope == "prompt"`: the prompt tokens, to which the gate's text mean is restricted
            in training (answers left out, as at inference). `AlignGPTForConditionalGeneration` takes it from
            `labels == -100` when not given; the processor returns it with `return_assistant_tokens_mask=True`, for
            trainers that compute the loss outside the model (TRL's fused LM head calls this model without labels).
            Ignored with `"conversation"`, where the gate reads every text token. A row that it leaves without text
            (labels supervising every token) keeps all its text, with a warning.
        gate_prompt_length (`int`, *optional*):
            Where the prompt ends: the gate reads only the positions before it (with either `gate_text_scope`), and
            placeholder ids after it are ordinary tokens. `generate()` sets it in every forward that carries images,
            for those that run more than the prompt: without a cache (`use_cache=False`) every step reruns the whole
            sequence, and assisted decoding runs the prompt with its first candidate tokens. Pass it when scoring
            continuations teacher-forced (prompt and answer in one forward) to condition them on the prompt alone, as
            generation is.
        mm_encoder_outputs (`dict`, *optional*):
            `{"image": get_image_features(...)}` computed beforehand; `generate()` does this once before prefill.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        alignment_weights = None
        if image_outputs is not None or pixel_values is not None:
            # all checks on the inputs come before the vision tower runs
            if image_outputs is None:
                self.check_pixel_values(pixel_values)
                num_images, num_patches = pixel_values.shape[0], self.num_image_tokens
            else:
                num_images, num_patches = len(image_outputs.pooler_output), image_outputs.pooler_output[0].shape[0]
            # the gate runs (and needs its text tokens, found with the placeholders) unless levels are given
            mode = _config_field(self.config, "alignment_mode")
            gate_runs = alignment_levels is None and mode in ("adaptive", "local")
            scope = _config_field(self.config, "gate_text_scope")
            if scope != "prompt":
                if scope != "conversation":
                    raise unknown_choice("gate_text_scope", scope, GATE_TEXT_SCOPES)
                gate_text_mask = None  # every text token, whatever the batch carries
            elif gate_text_mask is not None and tuple(gate_text_mask.shape) != tuple(inputs_embeds.shape[:2]):
                raise ValueError(
                    f"gate_text_mask must have the shape of input_ids, (batch, sequence) = "
                    f"{tuple(inputs_embeds.shape[:2])}, "
                    f"got {tuple(gate_text_mask.shape)}: True on the prompt tokens of each row (e.g. labels == -100)."
                )
            elif gate_runs and gate_text_mask is None and self.training and not is_tracing():
                logger.warning_once(
                    "gate_text_scope='prompt': this training forward got neither labels nor gate_text_mask, so the "
                    "gate averaged every text token, answers included, unlike at inference. Pass gate_text_mask (True "
                    "on the prompt tokens) with the batch. Trainers that compute the loss outside the model, like "
                    "TRL's SFTTrainer (fused LM head), never hand it the labels: AlignGPTInstructionCollator "
                    "(`aligngpt sft`, `make_sft_trainer`) adds the mask, and so does the processor when TRL's collator "
                    "asks for assistant masks (assistant_only_loss=True)."
                )
            # Where the prompt ends, when the sequence holds more (generated tokens without a cache, assisted
            # decoding's candidates): the gate reads the prompt alone, and placeholders count only there.
            prompt_length = self._prompt_length(gate_prompt_length, inputs_embeds.shape[1])
            gate_attention_mask = attention_mask
            if gate_runs and prompt_length is not None:
                gate_attention_mask = self._prompt_padding_mask(attention_mask, prompt_length, inputs_embeds)
            layout = self.locate_placeholders(
                input_ids, inputs_embeds, gate_attention_mask, gate_text_mask, alignment_levels, num_images,
                num_patches, gate_runs, prompt_length,
            )
            if image_outputs is None:
                image_outputs = self.get_image_features(
                    pixel_values=pixel_values,  # (CLIP and SigLIP cast it to their patch embedding's dtype)
                    vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=vision_feature_select_strategy,
                    return_dict=True,
                )
            image_features = _features_like(image_outputs.pooler_output, inputs_embeds)
            if image_features.shape[1] != num_patches:  # (a shape: no device sync)
                raise ValueError(
                    f"The vision tower gave {image_features.shape[1]} features per image, but the prompt holds "
                    f"{num_patches} <image> tokens per image (config.num_image_tokens, which the processor follows): "
                    "a vision_feature_layer / vision_feature_select_strategy passed to this call must give the "
                    "config's number of features; change the config (and the processor's num_image_tokens) instead."
                )
            alignment_vectors, alignment_weights = self.compute_alignment_vectors(
                image_features, inputs_embeds, layout.image_mask, layout.align_mask, gate_attention_mask,
                alignment_levels, gate_text_mask, layout.gate_text, layout.gate_text_counts, layout.gate_text_runs,
            )
            inputs_embeds = self.merge_placeholders(inputs_embeds, image_features, alignment_vectors, layout)
        elif input_ids is not None and input_ids.shape[1] > 1 and (cache is None or cache.get_seq_length() == 0):
            # Placeholders without images are a forgotten `pixel_values`, but only in a prompt: after it (a cache
            # holding tokens) they are tokens like any other, e.g. the candidates of prompt-lookup decoding copied
            # from the prompt. (Decode steps, one token each, skip the check.)
            torch_compilable_check(
                ~((input_ids == self.config.image_token_id) | (input_ids == self.config.alignment_token_id)).any(),
                "input_ids contain <image>/<align> placeholder tokens but no pixel_values were given: pass the "
                "images (the processor returns pixel_values) or remove the placeholders.",
            )
        if image_outputs is None and pixel_values is None and self._is_distributed_training():
            # A batch without images on one process of a distributed run: every process must run the same modules
            # (DeepSpeed ZeRO-3 gathers each module's weights collectively; DDP reduces the gradients together), so
            # the image branch runs on a blank image and adds exactly 0.
            inputs_embeds = inputs_embeds + self._blank_image_branch(
                inputs_embeds, alignment_levels, vision_feature_layer, vision_feature_select_strategy
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return AlignGPTModelOutputWithPast(
            **outputs, image_outputs=image_outputs, alignment_weights=alignment_weights
        )


# The prompt length of the `generate` call running in this thread, per model (`id`): what
# `AlignGPTForConditionalGeneration.prepare_inputs_for_generation` hands the forwards that carry images.
_GENERATION_PROMPTS = threading.local()


def _fill_columns_(logits: torch.Tensor, low: int, high: int, value: float) -> None:
    # Python-int indices: no index tensor to copy to the device at every decoding step; one fill kernel when the two
    # ids are adjacent (the converter appends them to the vocabulary side by side). `fill_` on a slice: item
    # assignment would first wrap the scalar in a tensor.
    if high - low == 1:
        logits[..., low : high + 1].fill_(value)
    else:
        logits[..., low].fill_(value)
        logits[..., high].fill_(value)


class _FillColumnsSkippingZeroGrad(torch.autograd.Function):
    """The in-place column fill, whose backward passes the gradient through untouched when its filled columns are
    already zero.

    Autograd's own backward for an in-place fill of a slice (`CopySlices`) clones the whole (batch, seq, vocab)
    gradient to zero the filled columns. Under cross-entropy (any softmax-based loss) those columns' gradient is
    already exactly zero (their probability is exp(lowest - max) = 0), so the clone only copies: 35-44 ms of a 1.8 s
    training step of the small benchmark model on the CPU. Checking two columns instead costs microseconds; any other
    gradient (a loss on the raw logits) still gets them zeroed, so the result is exact in every case. The check reads
    a value on the host, a synchronisation an accelerator should not pay for a ~30 us copy: CPU only.
    """

    @staticmethod
    def forward(ctx, logits, low, high, value):
        _fill_columns_(logits, low, high, value)
        ctx.mark_dirty(logits)
        ctx.columns = (low, high)
        return logits

    @staticmethod
    def backward(ctx, grad):
        low, high = ctx.columns
        if bool(grad[..., low].any()) or bool(grad[..., high].any()):
            grad = grad.clone()
            _fill_columns_(grad, low, high, 0.0)
        return grad, None, None, None


def suppress_placeholder_columns(logits: torch.Tensor, image_token_id: int, alignment_token_id: int) -> torch.Tensor:
    """Give the `<image>` and `<align>` columns of `logits` (..., vocab) the lowest value, in place (the LM head's
    backward does not need its output); returns `logits`."""
    low, high = sorted((image_token_id, alignment_token_id))
    lowest = torch.finfo(logits.dtype).min
    if logits.requires_grad and logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return _FillColumnsSkippingZeroGrad.apply(logits, low, high, lowest)
    _fill_columns_(logits, low, high, lowest)
    return logits


class AlignGPTForConditionalGeneration(AlignGPTPreTrainedModel, GenerationMixin):
    """[`AlignGPTModel`] with a language-modelling head: what `pipeline("image-text-to-text")` uses."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # full paths: quantizers match these from the start of a module name (see AlignGPTModel)
    _keep_in_fp32_modules = ["model.multi_modal_projector", "model.alignment_embeddings", "model.alignment_gate"]

    def __init__(self, config: AlignGPTConfig):
        super().__init__(config)
        self.model = AlignGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def generate(self, *args, **kwargs):
        """[`~GenerationMixin.generate`], after refusing, with a message, the two ways of generating that cannot fill
        a multimodal prompt's `<align>` slot: its vector is computed from the whole prompt's text and every image
        feature before the first token runs.

        It also tells every forward of this call where the prompt ends (`gate_prompt_length`, through
        [`prepare_inputs_for_generation`]): without a cache (`use_cache=False`) each step reruns the whole sequence,
        generated tokens included, and assisted decoding (prompt lookup, a draft model) runs the prompt and its first
        candidate tokens in one forward; the gate reads the prompt alone either way, as in plain cached decoding, and
        placeholder ids among the candidates are tokens. (Not a model kwarg: transformers hands those to a draft
        `assistant_model` too, which would refuse it.)"""
        config = kwargs.get("generation_config") or self.generation_config
        input_ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
        prompt = input_ids if isinstance(input_ids, torch.Tensor) else kwargs.get("inputs_embeds")
        prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
        chunk_size = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        is_assistant = bool(getattr(config, "is_assistant", False))
        if chunk_size is not None or is_assistant:  # (else nothing is read: no device sync in a plain call)
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and bool(
                (input_ids == self.config.alignment_token_id).any()
            ):
                if is_assistant and kwargs.get("cache") is None:
                    raise ValueError(
                        "An AlignGPT model cannot be the assistant_model of assisted generation: transformers gives "
                        "the assistant the prompt without its images, and AlignGPT's <image> and <align> slots need "
                        "them. Use prompt_lookup_num_tokens=... instead, or a text-only draft model."
                    )
                if chunk_size is not None and input_ids.shape[1] > chunk_size:
                    raise ValueError(
                        f"prefill_chunk_size={chunk_size} would split this {input_ids.shape[1]}-token prompt, but the "
                        "<align> vector at its start needs the whole prompt's text and every image feature before "
                        "the first chunk runs: pass prefill_chunk_size=None (or at least the prompt length)."
                    )
        # per thread and per model (a server may run several generate calls on one model at once)
        lengths = _GENERATION_PROMPTS.__dict__.setdefault("lengths", {})
        outer = lengths.get(id(self))
        lengths[id(self)] = prompt_length
        try:
            return super().generate(*args, **kwargs)
        finally:
            if outer is None:
                lengths.pop(id(self), None)
            else:
                lengths[id(self)] = outer

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """[`~GenerationMixin.prepare_inputs_for_generation`], plus `gate_prompt_length` (the prompt's length, which
        [`generate`] records) in the forwards that carry the images, unless the caller passed one. (Not in cached
        decode steps: a compiled decoding step would specialise on the int and recompile for every prompt length.)
        Its parameters are the parent's, named: `generate` reads `inputs_embeds` in this signature before it accepts
        generation from embeddings."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )
        prompt_length = _GENERATION_PROMPTS.__dict__.get("lengths", {}).get(id(self))
        if (
            prompt_length is not None
            and model_inputs.get("gate_prompt_length") is None
            and (model_inputs.get("mm_encoder_outputs") is not None or model_inputs.get("pixel_values") is not None)
        ):
            model_inputs["gate_prompt_length"] = prompt_length
        return model_inputs

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # (the old name would pass through **kwargs)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        alignment_levels: torch.LongTensor | None = None,
        gate_text_mask: torch.BoolTensor | None = None,
        gate_prompt_length: int | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> AlignGPTCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (-100 = ignored). `<image>` and `<align>` positions are never supervised.
        alignment_levels, gate_text_mask, gate_prompt_length, mm_encoder_outputs: see [`AlignGPTModel.forward`].
        """
        if labels is not None:
            # Placeholder targets (labels copied from input_ids, with input_ids or inputs_embeds) are never learnt.
            placeholders = (labels == self.config.image_token_id) | (labels == self.config.alignment_token_id)
            if kwargs.get("num_items_in_batch") is not None and bool(placeholders.any()):
                # Trainer has already divided by its count of targets, placeholders included (576 per image): a loss
                # that small would train silently at a fraction of the learning rate
                raise ValueError(
                    "The labels supervise <image>/<align> placeholder positions, and the Trainer counted them in "
                    "num_items_in_batch (the loss's denominator) before the model could drop them, which would shrink "
                    "the loss and its gradients. Set them to -100 in the data collator: "
                    "`labels = transformers_aligngpt.collators.mask_placeholders(labels, input_ids, processor)` (the "
                    "package's collators do it)."
                )
            labels = labels.masked_fill(placeholders, -100)
            if gate_text_mask is None and self.config.gate_text_scope == "prompt":
                gate_text_mask = labels == -100
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            alignment_levels=alignment_levels,
            gate_text_mask=gate_text_mask,
            gate_prompt_length=gate_prompt_length,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap is not None:  # (Gemma 2 / 3: as their own causal-LM heads do)
            logits = torch.tanh(logits / softcap) * softcap
        if self.config.suppress_placeholder_logits:
            # <image>/<align> are input slots, never outputs
            logits = suppress_placeholder_columns(logits, self.config.image_token_id, self.config.alignment_token_id)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return AlignGPTCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            alignment_weights=outputs.alignment_weights,
        )


# `generate()` calls `prepare_inputs_for_generation` at every decoding step, which, for a class registered with
# `register_for_auto_class` (this package's classes are, so that `save_pretrained` exports the code), runs
# `inspect.signature(self.forward)` each time (a check for old hub code): 30-65 us of host time per token on the
# benchmark CPU that LLaVA, a transformers class, does not pay. Computed once here (the same signature), it is cheap.
AlignGPTForConditionalGeneration.forward.__signature__ = inspect.signature(AlignGPTForConditionalGeneration.forward)

__all__ = [
    "AlignGPTPreTrainedModel",
    "AlignGPTModel",
    "AlignGPTForConditionalGeneration",
    "AlignGPTModelOutputWithPast",
    "AlignGPTCausalLMOutputWithPast",
]
