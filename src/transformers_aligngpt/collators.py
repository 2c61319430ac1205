"""Data collators for the two training phases of AlignGPT.

- [`AlignGPTPretrainingCollator`] (phase 1): image-caption pairs in the plain format `<image>{caption}\\n`, one
  alignment level per pair, loss on the caption only.
- [`AlignGPTInstructionCollator`] (phase 2): TRL's `DataCollatorForVisionLanguageModeling` (conversations with
  `messages` + `images`, text-only rows mixed in) plus what AlignGPT needs on top of it: placeholders are never
  supervised, a bos token starts every row as at inference, and `gate_text_mask` carries the prompt-only gate input
  (TRL's fused LM head calls the base model without `labels`, so the model cannot derive it itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from .configuration_aligngpt import GATE_TEXT_SCOPES
from .data import integer_level
from .processing_aligngpt import plain_pretraining_text

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)


def _load_image(image: Any) -> Image.Image:
    """A PIL image from a PIL image, a path, or a `datasets` image dict (`{"bytes": ..., "path": ...}`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
        import io

        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
        return Image.open(source).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"Image {str(image)!r} could not be read ({error}).") from error
    raise TypeError(f"Expected a PIL image or a path to an image, got {type(image).__name__}.")


def placeholder_ids(processor) -> tuple[int, int]:
    """(`<image>` id, `<align>` id) of an AlignGPT processor."""
    return processor.image_token_id, processor.alignment_token_id


def mask_placeholders(labels: torch.Tensor, input_ids: torch.Tensor, processor) -> torch.Tensor:
    """`labels` with every `<image>` and `<align>` position set to -100 (they are inputs, never targets)."""
    image_id, align_id = placeholder_ids(processor)
    return labels.masked_fill((input_ids == image_id) | (input_ids == align_id), IGNORE_INDEX)


@dataclass
class AlignGPTPretrainingCollator:
    """Phase-1 batches: plain-format image-caption pairs with their alignment level.

    Each example holds one image (`images`: a list with one PIL image or path, or `image`), a `caption` and an
    `alignment_level` (0..N-1, the pair's CLIP-score bucket). The text is `<image>{caption}\\n`; the processor adds
    bos, `<align>` and expands `<image>`, so a row reads `[bos, <align>, <image> x P, caption tokens, pad ...]`.
    Labels cover the caption tokens only. Returns `input_ids`, `attention_mask`, `pixel_values`, `labels` and
    `alignment_levels` (batch,).

    Args:
        processor: an `AlignGPTProcessor`.
        num_alignment_levels: N, to reject levels out of range with a clear message (the model checks again).
        max_length: truncates captions; must leave room for bos, `<align>`, the image tokens and one caption token.
        pad_to_square: LLaVA / AlignGPT pre-training resize images without padding them (`False`, the default).
    """

    processor: Any
    num_alignment_levels: int | None = None
    max_length: int | None = None
    pad_to_square: bool = False
    image_column: str = "images"
    caption_column: str = "caption"
    level_column: str = "alignment_level"
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(
                f"max_length={self.max_length} would cut the image tokens: a pre-training row needs bos, <align> and "
                f"{self.processor.num_image_tokens} image tokens before its caption, so max_length must be at least "
                f"{self.min_length}."
            )

    @property
    def min_length(self) -> int:
        """bos + `<align>` + image tokens + one caption token."""
        return self.processor.num_image_tokens + 3

    def _image(self, example: dict, index: int) -> Image.Image:
        if self.image_column in example:
            images = example[self.image_column]
            images = [images] if not isinstance(images, (list, tuple)) else list(images)
        elif "image" in example:
            images = [example["image"]]
        else:
            raise ValueError(
                f"Pre-training example {index} has no image: expected an {self.image_column!r} column (a list with one "
                f"image) or an 'image' column. Keys: {sorted(example)}."
            )
        if len(images) != 1:
            raise ValueError(
                f"Pre-training example {index} has {len(images)} images; the plain format takes exactly one image per "
                "caption."
            )
        return _load_image(images[0])

    def _level(self, example: dict, index: int) -> int:
        if example.get(self.level_column) is None:
            raise ValueError(
                f"Pre-training example {index} has no {self.level_column!r}: phase 1 needs the alignment level of "
                "every image-caption pair. Score the pairs with CLIP and bucket the scores into levels first "
                "(transformers_aligngpt.alignment_levels)."
            )
        value = example[self.level_column]
        level = integer_level(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        if level is None:
            raise ValueError(
                f"Pre-training example {index} has {self.level_column}={example[self.level_column]!r}, not an integer: "
                "levels are the indices 0..N-1 of CLIP-score buckets (int() would truncate 0.5 to 0). Bucket the "
                "scores with `aligngpt levels` (transformers_aligngpt.alignment_levels.add_alignment_levels)."
            )
        if self.num_alignment_levels is not None and not 0 <= level < self.num_alignment_levels:
            raise ValueError(
                f"Pre-training example {index} has {self.level_column}={level}, outside "
                f"0..{self.num_alignment_levels - 1} (the model has {self.num_alignment_levels} alignment levels)."
            )
        return level

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, texts, levels = [], [], []
        for index, example in enumerate(examples):
            if example.get(self.caption_column) is None:
                raise ValueError(f"Pre-training example {index} has no {self.caption_column!r}.")
            levels.append(self._level(example, index))
            images.append([self._image(example, index)])
            texts.append(plain_pretraining_text(example[self.caption_column], self.processor.image_token))
        batch = self.processor(
            images=images,
            text=texts,
            padding=True,
            padding_side="right",
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors=self.return_tensors,
            do_pad=self.pad_to_square,
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        image_id, _ = placeholder_ids(self.processor)
        # caption = every attended position after the row's last image token (bos, <align> and <image> come before)
        is_image = input_ids == image_id
        after_images = is_image.flip(-1).cumsum(-1).flip(-1) == 0
        labels = input_ids.masked_fill(~(after_images & attention_mask.bool()), IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": batch["pixel_values"],
            "labels": labels,
            "alignment_levels": torch.tensor(levels, dtype=torch.long),
        }


@dataclass
class AlignGPTInstructionCollator(DataCollatorForVisionLanguageModeling):
    """Phase-2 batches: TRL's vision-language collator plus AlignGPT's needs.

    On top of `DataCollatorForVisionLanguageModeling` (conversations in `messages` + `images`, or
    `prompt`/`completion`; text-only rows mixed in):
    - `<image>` / `<align>` positions never carry a label (TRL leaves them in when the loss is not assistant-only);
    - with `gate_text_scope="prompt"`, `gate_text_mask` (True where the token is not supervised) restricts the gate's
      text mean to the prompt, as at inference. `"conversation"` adds nothing: the gate averages the whole
      conversation, answers included, as the original code does in training. `None` takes neither (the model then
      averages every text token, which is `"conversation"`).
    """

    gate_text_scope: str | None = None

    def __post_init__(self):
        if self.gate_text_scope is not None and self.gate_text_scope not in GATE_TEXT_SCOPES:
            raise ValueError(
                f"gate_text_scope must be one of {', '.join(GATE_TEXT_SCOPES)} (or None), got {self.gate_text_scope!r}."
            )
        if self.gate_text_scope == "prompt" and not (self.assistant_only_loss or self.completion_only_loss):
            raise ValueError(
                "gate_text_scope='prompt' averages the non-supervised (prompt) tokens, so the labels must mark the "
                "prompt: use assistant_only_loss=True (conversations) or completion_only_loss=True "
                "(prompt/completion data), or gate_text_scope='conversation'."
            )

    def _collate_prompt_completion(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's prompt/completion batch without the bos that the processor (which starts every text it tokenises
        with bos, whatever `add_special_tokens` says) put before each completion: the model would learn to answer
        `<s>` first. Rows come flushed left from TRL, so every bos after a row's first position is one of those.
        `max_length` cuts after that (TRL would cut first, and so spend a token of the limit on the dropped bos)."""
        max_length, self.max_length = self.max_length, None
        try:
            batch = super()._collate_prompt_completion(examples)
        finally:
            self.max_length = max_length
        keys = ("input_ids", "attention_mask", "labels")
        tokenizer = self.processor.tokenizer
        if self.processor.bos_text is not None:
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            extra_bos = (input_ids == tokenizer.bos_token_id) & (positions > 0) & attention_mask.bool()
            if extra_bos.any():
                # each row's other tokens move left over its dropped bos (a stable sort puts the kept positions first,
                # in order); the freed slots at the end become padding
                order = torch.sort(extra_bos.to(torch.uint8), dim=1, stable=True).indices
                width = int((attention_mask.bool() & ~extra_bos).sum(-1).max())
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                for key, fill in zip(keys, (pad_id, 0, IGNORE_INDEX)):
                    batch[key] = batch[key].masked_fill(extra_bos, fill).gather(1, order)[:, :width]
        if max_length is not None:
            for key in keys:
                batch[key] = batch[key][:, :max_length]
        return batch

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["labels"] = mask_placeholders(batch["labels"], batch["input_ids"], self.processor)
        if self.max_length is not None and "pixel_values" in batch:
            image_id, _ = placeholder_ids(self.processor)
            found = int((batch["input_ids"] == image_id).sum())
            expected = len(batch["pixel_values"]) * self.processor.num_image_tokens
            if found != expected:
                raise ValueError(
                    f"max_length={self.max_length} cut image tokens ({found} of {expected} <image> tokens left in the "
                    "batch). Raise max_length or set it to None."
                )
        if self.max_length is not None and batch["input_ids"].shape[1] >= self.max_length:
            unsupervised = int((batch["labels"] == IGNORE_INDEX).all(-1).sum())
            if unsupervised:
                # a silent failure otherwise: a run whose answers are all cut away trains nothing (loss 0)
                logger.warning_once(
                    f"max_length={self.max_length} leaves some rows without any supervised token (their answers "
                    "come after the cut): they train nothing. Raise max_length or set it to None."
                )
        # (the processor's own gate_text_mask, from the assistant masks, gives way to the labels: the same prompt,
        # and the only source for prompt/completion data)
        batch.pop("gate_text_mask", None)
        if self.gate_text_scope == "prompt":
            batch["gate_text_mask"] = batch["labels"] == IGNORE_INDEX
        return batch


__all__ = [
    "IGNORE_INDEX",
    "AlignGPTInstructionCollator",
    "AlignGPTPretrainingCollator",
    "mask_placeholders",
]
