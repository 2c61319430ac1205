"""AlignGPT processor: LLaVA-1.5 image preprocessing + a tokenizer with `<image>` and `<align>` placeholders.

What the processor adds to a prompt (the model never changes the sequence length):
- every `<image>` becomes `num_image_tokens` copies of itself, one per image feature;
- a row with at least one image gets one `<align>` right after bos (before the system prompt), the slot the
  model fills with the row's alignment vector. Rows without an image get none.
"""

import re
from collections.abc import Mapping

from PIL import UnidentifiedImageError
from transformers import ProcessorMixin

try:  # the lookbehind that skips control tokens marked as user text (`sanitize_control_tokens=True`)
    from transformers.processing_utils import _UNMARKED
except ImportError:  # (transformers without that option marks nothing)
    _UNMARKED = ""

# The Vicuna v1 template of the released AlignGPT / LLaVA-1.5 instruct checkpoints:
#   "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:"
# An image item renders as "<image>\n" where it stands in the user's content. Assistant answers (and the eos
# that ends them) sit inside {% generation %} markers so that `return_assistant_tokens_mask=True` /
# TRL's `assistant_only_loss=True` supervise only them.
VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    # one image: first, as LLaVA's preprocessing puts it (`<image>\nQ` also for a turn written `Q\n<image>`)
    "{%- elif content | selectattr('type', 'equalto', 'image') | list | length == 1 -%}{{- '<image>\\n' -}}"
    "{%- for item in content -%}{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}"
    # several images: in place (their order is the pixel_values' order)
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_prompt = render(messages[0]['content']) -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system_prompt = '" + VICUNA_V1_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- endif -%}"
    "{{- system_prompt + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + render(message['content']) + ' ' -}}"
    # (the space after "ASSISTANT:" is the answer's: sentencepiece gives it a token of its own, "▁", which the
    # original supervises, and the inference prompt ends at the colon)
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + render(message['content']) + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


# The built-in template as this package saved it before the space after "ASSISTANT:" moved into the answer: a
# checkpoint saved with it (converted or trained before) gets the current one, whose prompts are the same and whose
# answer masks also cover sentencepiece's "▁" token for that space.
_PREVIOUS_CHAT_TEMPLATES = (
    VICUNA_V1_CHAT_TEMPLATE.replace(
        "{{- 'ASSISTANT:' -}}{%- generation -%}{{- ' ' + render(message['content'])",
        "{{- 'ASSISTANT: ' -}}{%- generation -%}{{- render(message['content'])",
    ),
)


def prefix_every_chunk(tokenizer) -> None:
    """A sentencepiece (Metaspace) tokenizer made to give every chunk between special tokens its own "▁", as the
    original does (it tokenises the text before and after `<image>` separately), and flagged `legacy=True` so that
    `AutoTokenizer.from_pretrained` rebuilds the same pipeline. transformers 5 loads Llama / Vicuna tokenizers
    non-legacy by default, which gives the "▁" to the text's first word only; this processor writes bos (and
    `<align>`) into the text, so there every row's first word would lose it. Other tokenizers are left alone."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        return
    metaspace = backend.pre_tokenizer
    if metaspace.prepend_scheme != "always":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=metaspace.replacement, prepend_scheme="always", split=metaspace.split
        )
    if hasattr(tokenizer, "legacy"):
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True  # saved to tokenizer_config.json


def plain_pretraining_text(caption: str, image_token: str = "<image>") -> str:
    """The plain pre-training format of LLaVA / AlignGPT: `<image>{caption}\\n` (the loss covers the caption)."""
    return f"{image_token}{caption}\n"


def _insert(text: str, offsets: list[dict], at: int, original_at: int, string: str, kind: str):
    """Inserts `string` at character `at` of an expanded row (`original_at` in the caller's text) and shifts the
    recorded replacement offsets, which ProcessorMixin uses to map character spans (assistant masks)."""
    width = len(string)
    shifted = [
        {**r, "new_span": tuple(x + width if x >= at else x for x in r["new_span"])} for r in offsets
    ]
    inserted = {
        "type": kind, "span": (original_at, original_at), "new_span": (at, at + width), "text": "",
        "replacement": string,
    }
    return text[:at] + string + text[at:], sorted([inserted] + shifted, key=lambda r: r["new_span"][0])


class AlignGPTProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: a LLaVA image processor with `do_pad=True` (LLaVA-1.5's pad-to-square with the image mean
            colour, then CLIP resize / centre-crop / normalise); the PIL backend needs no torchvision.
        tokenizer: a tokenizer that knows `<image>` and `<align>` as special tokens.
        num_image_tokens (`int`): image features per image, `config.num_image_tokens` of the model.
        chat_template (`str`, *optional*): defaults to the Vicuna v1 template.
        image_token / alignment_token (`str`): the placeholder strings.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 576,
        chat_template: str | None = None,
        image_token: str = "<image>",
        alignment_token: str = "<align>",
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.alignment_token = alignment_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.alignment_token_id = tokenizer.convert_tokens_to_ids(self.alignment_token)
        if self.image_token_id in (None, tokenizer.unk_token_id) or self.alignment_token_id in (
            None,
            tokenizer.unk_token_id,
        ):
            raise ValueError(
                f"The tokenizer must know {self.image_token!r} and {self.alignment_token!r} as special tokens: "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{self.image_token!r}, "
                f"{self.alignment_token!r}]}})` and resize the model's embeddings."
            )
        prefix_every_chunk(tokenizer)
        if getattr(tokenizer, "legacy", None) is True:
            # The tokenizer reads the flag when loaded but does not keep it in init_kwargs, so a save would write the
            # default (False) and the reloaded tokenizer would split differently: written back here, it survives
            # save_pretrained / push_to_hub.
            tokenizer.init_kwargs["legacy"] = True
        if chat_template is None or chat_template.strip() in _PREVIOUS_CHAT_TEMPLATES:
            chat_template = VICUNA_V1_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        try:
            return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"An image could not be decoded ({error}). Check that every image path or file is a readable "
                "image (PNG, JPEG, ...); re-encode or drop corrupt files."
            ) from error

    @property
    def bos_text(self) -> str | None:
        """The bos string when the tokenizer starts sequences with bos (Llama / Vicuna), else None (Qwen2 ...)."""
        if not hasattr(self, "_bos_text"):
            tokenizer = self.tokenizer
            adds_bos = tokenizer.bos_token is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
            self._bos_text = tokenizer.bos_token if adds_bos else None
        return self._bos_text

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        # Every row starts with exactly one bos, written into the text by `get_text_with_replacements`, so that
        # callers that tokenise with add_special_tokens=False (TRL's collators, apply_chat_template) still give the
        # model the sequences it was trained on.
        if text is not None and self.bos_text is not None:
            kwargs["add_special_tokens"] = False
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def get_text_with_replacements(self, text, images_replacements=(), videos_replacements=(), audio_replacements=()):
        """Expands `<image>` (ProcessorMixin), starts every row with bos, and puts `<align>` right after bos in rows
        that have an image.

        Insertions are recorded like placeholder expansions, so that `return_assistant_tokens_mask=True`
        (assistant-only loss) still finds the answers at the right characters.
        """
        text, offsets = super().get_text_with_replacements(
            text, list(images_replacements), list(videos_replacements), list(audio_replacements)
        )
        offsets = offsets or [[] for _ in text]
        bos, align = self.bos_text, self.alignment_token
        for row in range(len(text)):
            has_image = any(r["type"] == "image" for r in offsets[row])
            added_bos = bos is not None and not text[row].startswith(bos)
            if added_bos:
                text[row], offsets[row] = _insert(text[row], offsets[row], 0, 0, bos, "bos")
            at = len(bos) if bos is not None else 0
            found = self._alignment_placeholders(text[row])
            if found:
                # already in place (text that went through this processor before), or typed in the text
                if not has_image or found[0] != at or len(found) > 1:
                    where = "in a row without an image" if not has_image else "elsewhere than right after bos"
                    raise ValueError(
                        f"Text {row} holds {align!r} {where}: it is AlignGPT's reserved token, which the processor "
                        "puts right after bos in rows with an image. Remove it from the text."
                    )
            elif has_image:
                original_at = 0 if added_bos else at
                text[row], offsets[row] = _insert(text[row], offsets[row], at, original_at, align, "alignment")
        return text, offsets

    def _alignment_placeholders(self, text: str) -> list[int]:
        """Character positions of `<align>` in `text` as a placeholder, not as user text that `apply_chat_template
        (sanitize_control_tokens=True)` marked."""
        return [match.start() for match in re.finditer(_UNMARKED + re.escape(self.alignment_token), text)]

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """ProcessorMixin's check that truncation kept every `<image>`, and the same for `<align>`: truncating from
        the left cuts the start of a row, bos and `<align>` first, where the images may all survive."""
        super()._check_special_mm_tokens(text, text_inputs, modalities)
        input_ids = text_inputs["input_ids"]
        if hasattr(input_ids, "tolist"):
            input_ids = input_ids.tolist()
        bos_id = self.tokenizer.bos_token_id if self.bos_text is not None else None
        cut = []
        for row, (ids, sample) in enumerate(zip(input_ids, text)):
            ids = list(ids)
            expected = len(self._alignment_placeholders(sample))
            if ids.count(self.alignment_token_id) != expected:
                cut.append(row)
            elif expected and bos_id is not None:
                # a cut of one token takes bos alone: `<align>` then opens the row
                at = ids.index(self.alignment_token_id)
                if at == 0 or ids[at - 1] != bos_id:
                    cut.append(row)
        if cut:
            raise ValueError(
                f"Truncation cut the start of rows {cut[:8]}, where bos and the {self.alignment_token} token sit "
                "(before the system prompt): truncate from the right (tokenizer.truncation_side = 'right'), or raise "
                "max_length or pass truncation=False."
            )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; with `return_assistant_tokens_mask=True` (TRL's assistant-only loss)
        the output also holds `gate_text_mask`, True on the tokens outside the answers: the prompt, which the gate
        of a `gate_text_scope="prompt"` model averages in training. Trainers that compute the loss outside the model
        (TRL's fused LM head) never give it the labels it would otherwise take the prompt from."""
        out = super().apply_chat_template(conversation, chat_template, **kwargs)
        if kwargs.get("return_assistant_tokens_mask") and isinstance(out, Mapping) and "assistant_masks" in out:
            masks = out["assistant_masks"]
            out["gate_text_mask"] = [[m == 0 for m in row] for row in masks] if isinstance(masks, list) else masks == 0
        return out

    def _process_images(self, images, **kwargs):
        try:
            return super()._process_images(images, **kwargs)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"An image could not be decoded ({error}). Re-encode or drop the corrupt image."
            ) from error

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        from transformers.processing_utils import MultiModalData

        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values"]))


__all__ = ["AlignGPTProcessor", "VICUNA_V1_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM_PROMPT", "plain_pretraining_text"]
