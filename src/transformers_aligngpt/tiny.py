"""Tiny AlignGPT models built from configs, for the demo, the examples and the tests: nothing is downloaded.

The tokenizer is a small BPE trained offline with the `tokenizers` library on a built-in corpus (plus any texts
you pass), wrapped as a transformers fast tokenizer with `<image>` and `<align>` as special tokens.
"""

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedConfig, PreTrainedTokenizerFast
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from .configuration_aligngpt import AlignGPTConfig
from .modeling_aligngpt import AlignGPTForConditionalGeneration
from .processing_aligngpt import VICUNA_V1_SYSTEM_PROMPT, AlignGPTProcessor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<align>"]

BUILTIN_CORPUS = [
    VICUNA_V1_SYSTEM_PROMPT,
    "USER: ASSISTANT: What is shown in the image? Describe the image.",
    "How many squares are there? Answer the question using a single word or phrase.",
    "a red circle on a white background. two blue squares and a green triangle at the top left.",
    "Is there a yellow circle? Yes. No. One. Two. Three. Four. red green blue yellow purple orange black white",
    "circle square triangle top bottom left right center middle small large the a an and of in on at is are",
    "What colour is the shape? Which shape is at the bottom right? What is 2 plus 3? 0 1 2 3 4 5 6 7 8 9",
    "<image>\nWhat is in the picture?\n",
]


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Llama-like BPE tokenizer (metaspace, bos added) trained offline on the built-in corpus plus `texts`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    # every printable character is in the alphabet, so no text ever maps to <unk>
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(BUILTIN_CORPUS) + list(texts), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "alignment_token": "<align>"},
        padding_side="left",
    )


def build_tiny_clip_tokenizer(
    texts: Iterable[str], vocab_size: int = 400, model_max_length: int = 77
) -> PreTrainedTokenizerFast:
    """A CLIP-like text tokenizer trained offline: byte-level BPE, lower-cased, `<|startoftext|> ... <|endoftext|>`
    (CLIP's text tower pools at the end-of-text token)."""
    texts = list(texts)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(texts)] * 4 + texts, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<|startoftext|>"), tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_vision_config(image_size: int = 16, patch_size: int = 4, hidden_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def tiny_text_config(vocab_size: int, hidden_size: int = 64, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    text_config: PreTrainedConfig | None = None,
    vision_config: PreTrainedConfig | None = None,
    **kwargs,
) -> AlignGPTConfig:
    """An AlignGPT config whose placeholder ids come from `tokenizer` (2-layer towers, hidden 32 / 64)."""
    kwargs.setdefault("alignment_gate_hidden_size", 16)
    return AlignGPTConfig(
        vision_config=vision_config or tiny_vision_config(),
        text_config=text_config or tiny_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"),
        **kwargs,
    )


def build_processor(tokenizer, config: AlignGPTConfig, image_mean=None, image_std=None) -> AlignGPTProcessor:
    """LLaVA-1.5 preprocessing (pad to square, resize, centre-crop, normalise) sized for `config`'s tower."""
    size = config.vision_config.image_size
    image_kwargs = {"image_mean": image_mean, "image_std": image_std} if image_mean is not None else {}
    image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **image_kwargs
    )
    return AlignGPTProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens
    )


def build_tiny_model(texts: Iterable[str] = (), seed: int = 0, **config_kwargs):
    """(model, processor): a random tiny AlignGPT and its processor, built from configs in a second."""
    import torch

    tokenizer = build_tiny_tokenizer(texts)
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    # `_from_config`, not the constructor: under DeepSpeed ZeRO-3 it builds the model inside `zero.Init` and
    # initialises the partitioned weights (the constructor would initialise the already partitioned towers)
    model = AlignGPTForConditionalGeneration._from_config(config).eval()
    return model, build_processor(tokenizer, config)


__all__ = [
    "build_tiny_tokenizer",
    "build_tiny_clip_tokenizer",
    "tiny_vision_config",
    "tiny_text_config",
    "tiny_config",
    "build_processor",
    "build_tiny_model",
]
