"""AlignGPTProcessor: placeholders, chat template, pad-to-square preprocessing, bad input."""

import numpy as np
import pytest
from PIL import Image

from conftest import chat
from transformers_aligngpt import VICUNA_V1_SYSTEM_PROMPT, AlignGPTProcessor, plain_pretraining_text


def test_vicuna_v1_template_renders_the_original_strings(processor):
    prompt = processor.apply_chat_template(chat("What is shown in the image?"), add_generation_prompt=True)
    assert prompt == f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat is shown in the image? ASSISTANT:"
    two_turns = chat("What is it?", answer="A box.") + [
        {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    assert processor.apply_chat_template(two_turns) == (
        f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat is it? ASSISTANT: A box.</s>USER: Which colour? "
        "ASSISTANT: Red.</s>"
    )
    custom_system = [{"role": "system", "content": "Be brief."}] + chat("Hi?", with_image=False)
    assert processor.apply_chat_template(custom_system, add_generation_prompt=True) == "Be brief. USER: Hi? ASSISTANT:"
    # a turn written "Q\n<image>" (as in part of LLaVA-665K) is trained as LLaVA does: the one image first
    image_last = [{"role": "user", "content": [{"type": "text", "text": "What is shown in the image?"},
                                              {"type": "image"}]}]
    assert processor.apply_chat_template(image_last, add_generation_prompt=True) == prompt
    # several images stay where they are: their order is the order of the pixel values
    two = [{"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"},
                                        {"type": "text", "text": "right:"}, {"type": "image"}]}]
    assert processor.apply_chat_template(two, add_generation_prompt=True).endswith(
        "USER: Left:<image>\nright:<image>\n ASSISTANT:"
    )


def test_alignment_token_after_bos_only_for_image_rows_and_image_expansion(processor, config, images):
    texts = [
        processor.apply_chat_template(chat("What is shown?"), add_generation_prompt=True),
        processor.apply_chat_template(chat("What is 2 plus 3?", with_image=False), add_generation_prompt=True),
    ]
    processor.tokenizer.padding_side = "right"
    batch = processor(images=images[:1], text=texts, padding=True)
    processor.tokenizer.padding_side = "left"
    image_row, text_row = batch["input_ids"]
    tok = processor.tokenizer
    assert image_row[:2] == [tok.bos_token_id, config.alignment_token_id]
    assert image_row.count(config.alignment_token_id) == 1
    assert image_row.count(config.image_token_id) == config.num_image_tokens == 16
    # the image tokens are contiguous, where <image> stood
    first = image_row.index(config.image_token_id)
    assert image_row[first : first + 16] == [config.image_token_id] * 16
    assert text_row[0] == tok.bos_token_id
    assert config.alignment_token_id not in text_row and config.image_token_id not in text_row
    # the rest of the image row is the text tokenised as usual
    plain = tok(texts[0].replace("<image>", ""))["input_ids"]
    kept = [t for t in image_row if t not in (config.alignment_token_id, config.image_token_id, tok.pad_token_id)]
    assert len(kept) >= len(plain) - 2  # same text, up to the split around the placeholder


def test_alignment_token_typed_in_the_text_is_refused(processor, config, images):
    tok = processor.tokenizer
    # text that already went through the processor keeps its one <align> after bos (no second one)
    once = processor(images=images[:1], text=["<image>a box\n"])["input_ids"][0]
    again = processor(images=images[:1], text=[tok.bos_token + "<align><image>a box\n"])["input_ids"][0]
    assert again == once and once.count(config.alignment_token_id) == 1
    # typed by a user, it would move (or double) the alignment slot: a clear error instead
    question = processor.apply_chat_template(chat("What does the HTML tag <align> do?"), add_generation_prompt=True)
    with pytest.raises(ValueError, match="Text 0 holds '<align>' elsewhere than right after bos"):
        processor(images=images[:1], text=[question])
    with pytest.raises(ValueError, match="Text 1 holds '<align>' in a row without an image"):
        processor(images=images[:1], text=["<image>a box\n", "what is <align>?"])
    # ... unless the chat marks user text as text (transformers' sanitize_control_tokens): then it is a word
    for with_image in (True, False):
        messages = chat("What does the HTML tag <align> do?", with_image)
        if with_image:
            messages[0]["content"][0]["image"] = images[0]
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            sanitize_control_tokens=True)
        assert out["input_ids"][0].count(config.alignment_token_id) == int(with_image)
        assert "align" in tok.decode(out["input_ids"][0], skip_special_tokens=True)


def test_assistant_mask_covers_answers_and_eos_only_and_comes_with_the_gate_prompt(processor, images):
    messages = chat("What is it?", answer="A red box.")
    messages[0]["content"][0]["image"] = images[0]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    assert ids[1] == processor.alignment_token_id
    assert ids.count(processor.image_token_id) == processor.num_image_tokens
    supervised = processor.tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert supervised.strip() == "A red box.</s>"
    # with it, the gate's prompt (TRL's fused LM head never hands the labels to the model): all before the answer
    gate = out["gate_text_mask"][0].tolist()
    start = gate.index(False)
    assert all(gate[:start]) and not any(gate[start:])
    assert processor.tokenizer.decode(ids[start:]).strip() == "A red box.</s>"
    plain = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert "gate_text_mask" not in plain


def test_pad_to_square_matches_an_independent_pil_computation(processor, images):
    image = images[0]  # 24 x 14, wide
    pixel_values = processor(images=image, text="<image>x", return_tensors="np")["pixel_values"][0]
    ip = processor.image_processor
    background = tuple(int(m * 255) for m in ip.image_mean)
    square = Image.new("RGB", (24, 24), background)
    square.paste(image, (0, (24 - 14) // 2))
    resized = np.asarray(square.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = ((resized - np.array(ip.image_mean)) / np.array(ip.image_std)).transpose(2, 0, 1)
    np.testing.assert_allclose(pixel_values, expected, atol=1e-5)


def test_plain_pretraining_format(processor):
    assert plain_pretraining_text("a red circle") == "<image>a red circle\n"


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = AlignGPTProcessor.from_pretrained(tmp_path)
    assert reloaded.num_image_tokens == processor.num_image_tokens
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.image_processor.do_pad is True


def test_a_checkpoint_saved_with_the_previous_builtin_template_gets_the_current_one(processor, tmp_path):
    """The package's template before the space after "ASSISTANT:" moved into the answer (sentencepiece's lone "▁"
    was left unsupervised) is replaced on load; the prompts it renders are the same. A template of the user's own
    is kept."""
    from transformers import AutoProcessor

    from transformers_aligngpt.processing_aligngpt import _PREVIOUS_CHAT_TEMPLATES, VICUNA_V1_CHAT_TEMPLATE

    own = VICUNA_V1_CHAT_TEMPLATE.replace("USER: ", "HUMAN: ")
    try:
        processor.chat_template = _PREVIOUS_CHAT_TEMPLATES[0]
        processor.save_pretrained(tmp_path / "old")
        processor.chat_template = own
        processor.save_pretrained(tmp_path / "own")
    finally:
        processor.chat_template = VICUNA_V1_CHAT_TEMPLATE
    assert "'ASSISTANT: '" in (tmp_path / "old" / "chat_template.jinja").read_text()
    assert AutoProcessor.from_pretrained(tmp_path / "old").chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert AutoProcessor.from_pretrained(tmp_path / "own").chat_template == own


# ---- bad input -------------------------------------------------------------------------------------------------


def test_image_placeholder_count_mismatch(processor, images):
    with pytest.raises(ValueError, match="1 <image> tokens and 2 images"):
        processor(images=images, text="<image>one placeholder")
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image>where is it")


def test_truncation_that_cuts_image_tokens(processor, images):
    with pytest.raises(ValueError, match="truncat"):
        processor(images=images[:1], text="<image>" + " red" * 40, truncation=True, max_length=10)


def test_truncation_from_the_left_that_cuts_the_alignment_token(processor, images):
    text = "<image>" + " red" * 20
    full = len(processor(images=images[:1], text=text)["input_ids"][0])
    side, processor.tokenizer.truncation_side = processor.tokenizer.truncation_side, "left"
    try:
        # every image token survives (only the start is cut), so only the <align> check can see it
        # two tokens cut: bos and <align>; one: bos alone (the row then opens with <align>)
        for cut in (2, 1):
            expected = r"Truncation cut the start of rows \[0\], where bos and the <align>.*'right'"
            with pytest.raises(ValueError, match=expected):
                processor(images=images[:1], text=text, truncation=True, max_length=full - cut)
        # (a row that fits is untouched)
        kept = processor(images=images[:1], text=text, truncation=True, max_length=full)
        assert len(kept["input_ids"][0]) == full
    finally:
        processor.tokenizer.truncation_side = side


def test_undecodable_image(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="could not be decoded"):
        processor(images=str(broken), text="<image>x")


def test_tokenizer_without_placeholders_is_rejected(processor):
    from transformers_aligngpt.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="must know"):
        AlignGPTProcessor(image_processor=processor.image_processor, tokenizer=tok, alignment_token="<nope>")


def test_exactly_one_bos_whatever_add_special_tokens_says(processor, images):
    """TRL tokenises rendered chats with add_special_tokens=False: rows must still start with one bos."""
    text = processor.apply_chat_template(chat("What is it?", answer="A box."))
    bos = processor.tokenizer.bos_token_id
    for add_special_tokens in (True, False):
        ids = processor(images=images[:1], text=[text], add_special_tokens=add_special_tokens)["input_ids"][0]
        assert ids[:2] == [bos, processor.alignment_token_id] and ids.count(bos) == 1
    already = processor(images=images[:1], text=[processor.tokenizer.bos_token + text])["input_ids"][0]
    assert already == ids
    text_only = processor(text=["Hello there"], add_special_tokens=False)["input_ids"][0]
    assert text_only[0] == bos and text_only.count(bos) == 1
