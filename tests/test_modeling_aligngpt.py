"""AlignGPTModel / AlignGPTForConditionalGeneration on tiny random configs.

Numbers are checked against independent computations written out here (per-row loops over plain tensors), not
against the model itself.
"""

import copy
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import chat
from transformers_aligngpt import AlignGPTConfig, AlignGPTForConditionalGeneration


def prompts(processor, questions, with_image=True):
    return [processor.apply_chat_template(chat(q, with_image), add_generation_prompt=True) for q in questions]


def embeddings_seen_by_lm(model, inputs):
    """The decoder's input embeddings (hidden_states[0]) for `inputs`."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out, out.hidden_states[0]


def reference_alignment_vector(model, input_ids, pixel_values, attention_mask=None):
    """Per-row, loop-based re-computation of METHOD.md's formula: E[N-1] + softmax(gate(d)) @ E[:N-1]."""
    inner = model.model
    config = model.config
    table = inner.alignment_embeddings.weight
    n = config.num_alignment_levels
    with torch.no_grad():
        tower = inner.vision_tower(pixel_values, output_hidden_states=True)
        feats = inner.multi_modal_projector(tower.hidden_states[config.vision_feature_layer][:, 1:])
        embeds = inner.get_input_embeddings()(input_ids)
        vectors, weights = [], []
        image_index = 0
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            align_pos = ids.index(config.alignment_token_id)
            keep = [
                j
                for j in range(align_pos + 1, len(ids))
                if ids[j] != config.image_token_id
                and (attention_mask is None or attention_mask[row, j] == 1)
            ]
            text_mean = embeds[row, keep].mean(0)
            count = ids.count(config.image_token_id) // config.num_image_tokens
            row_weights = []
            for _ in range(count):
                d = feats[image_index] @ text_mean
                row_weights.append(torch.softmax(inner.alignment_gate.fc2(F.gelu(inner.alignment_gate.fc1(d))), -1))
                image_index += 1
            w = torch.stack(row_weights).mean(0)
            weights.append(w)
            vectors.append(table[n - 1] + w @ table[: n - 1])
    return torch.stack(vectors), torch.stack(weights), feats


def test_placeholders_receive_image_features_and_alignment_vector(model, processor, images):
    inputs = processor(images=images, text=prompts(processor, ["What is shown?", "How many squares are there?"]),
                       return_tensors="pt", padding=True)
    out, embeds = embeddings_seen_by_lm(model, inputs)
    config = model.config
    expected_vectors, expected_weights, feats = reference_alignment_vector(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    )
    image_mask = inputs["input_ids"] == config.image_token_id
    align_mask = inputs["input_ids"] == config.alignment_token_id
    assert align_mask.sum(-1).tolist() == [1, 1]
    torch.testing.assert_close(embeds[image_mask], feats.reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(embeds[align_mask], expected_vectors, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.alignment_weights, expected_weights, atol=1e-6, rtol=1e-5)
    # the two prompts/images must not get the same mix: the gate reads the instruction
    assert not torch.allclose(out.alignment_weights[0], out.alignment_weights[1])
    # other text positions are plain token embeddings
    text = ~(image_mask | align_mask)
    torch.testing.assert_close(embeds[text], model.get_input_embeddings()(inputs["input_ids"])[text])


def test_alignment_levels_select_their_embedding(model, processor, images):
    inputs = processor(images=images, text=["<image>a red box\n", "<image>a tall blue box\n"], return_tensors="pt",
                       padding=True)
    levels = torch.tensor([2, 7])
    out, embeds = embeddings_seen_by_lm(model, {**inputs, "alignment_levels": levels})
    align_mask = inputs["input_ids"] == model.config.alignment_token_id
    torch.testing.assert_close(embeds[align_mask], model.model.alignment_embeddings.weight[levels])
    assert out.alignment_weights is None


@pytest.mark.parametrize("mode", ["global", "local", "mean", "fixed"])
def test_alignment_modes(model, processor, images, mode):
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    expected_adaptive, weights, _ = reference_alignment_vector(model, inputs["input_ids"], inputs["pixel_values"])
    table = model.model.alignment_embeddings.weight.detach()
    expected = {
        "global": table[-1],
        "local": weights[0] @ table[:-1],
        "mean": table[-1] + table[:-1].mean(0),
        "fixed": table[3],
    }[mode]
    model.config.alignment_mode = mode
    model.config.fixed_alignment_level = 3
    _, embeds = embeddings_seen_by_lm(model, inputs)
    torch.testing.assert_close(embeds[inputs["input_ids"] == model.config.alignment_token_id][0], expected,
                               atol=1e-5, rtol=1e-5)


def test_text_only_rows_untouched_and_padding_sides_agree(model, processor, images):
    texts = prompts(processor, ["What is shown in this picture?"]) + prompts(processor, ["What is 2 plus 3?"], False)
    singles = [
        processor(images=images[:1], text=texts[0], return_tensors="pt"),
        processor(text=texts[1], return_tensors="pt"),
    ]
    assert (singles[1]["input_ids"] != model.config.alignment_token_id).all()
    with torch.no_grad():
        single_logits = [model(**inputs).logits[0] for inputs in singles]
        # the text-only row is exactly what the bare language model + head computes
        lm_only = model.lm_head(model.model.language_model(input_ids=singles[1]["input_ids"]).last_hidden_state)[0]
    torch.testing.assert_close(single_logits[1], lm_only)
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        batch = processor(images=images[:1], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**batch).logits
        for row, expected in enumerate(single_logits):
            kept = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row][kept], expected, atol=2e-5, rtol=1e-4)
    processor.tokenizer.padding_side = "left"


def test_attention_mask_none_matches_full_mask(model, processor, images):
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    with torch.no_grad():
        with_mask = model(**inputs).logits
        without = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(with_mask, without)


def test_several_images_in_one_row_average_their_gate_weights(model, processor, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Compare the two pictures."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[images], text=[text], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.alignment_token_id).sum() == 1
    out, embeds = embeddings_seen_by_lm(model, inputs)
    expected_vectors, expected_weights, _ = reference_alignment_vector(
        model, inputs["input_ids"], inputs["pixel_values"]
    )
    torch.testing.assert_close(out.alignment_weights, expected_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(embeds[inputs["input_ids"] == model.config.alignment_token_id], expected_vectors,
                               atol=1e-5, rtol=1e-5)



def test_batch_with_two_one_and_no_images_equals_rows_one_at_a_time(model, processor, images):
    # the batched image->row map (searchsorted + index_add) against the one-row path, rows with 2, 0 and 1 images
    def chat(n, question):
        content = [{"type": "image"}] * n + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [chat(2, "Compare the two pictures."), chat(0, "What is 2 plus 3?"), chat(1, "What colour is it?")]
    row_images = [images[:2], [], images[1:2]]
    batch = processor(images=[im for ims in row_images for im in ims], text=texts, return_tensors="pt", padding=True)
    out, embeds = embeddings_seen_by_lm(model, batch)
    align_mask = batch["input_ids"] == model.config.alignment_token_id
    assert align_mask.sum(-1).tolist() == [1, 0, 1]
    for row, (text, ims) in enumerate(zip(texts, row_images)):
        single = processor(images=ims or None, text=[text], return_tensors="pt")
        single_out, single_embeds = embeddings_seen_by_lm(model, single)
        kept = batch["attention_mask"][row].bool()
        torch.testing.assert_close(embeds[row][kept], single_embeds[0], atol=1e-5, rtol=1e-5)
        if ims:
            torch.testing.assert_close(out.alignment_weights[row], single_out.alignment_weights[0], atol=1e-6,
                                       rtol=1e-5)

def sharpen_gate(model):
    """A gate whose mix moves visibly with its text, and alignment vectors that move the logits (a random tiny gate
    is nearly uniform whatever it reads), as a trained model's."""
    with torch.no_grad():
        model.model.alignment_gate.fc1.weight.mul_(300)
        model.model.alignment_embeddings.weight.mul_(20)
    return model


def test_generate_cache_matches_no_cache_and_runs_vision_once(model, processor, images):
    sharpen_gate(model)
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    settings = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(**inputs, **settings)
    assert len(calls) == 1, "the vision tower must run once (prefill only) with the KV cache"
    hook.remove()
    # Without a cache every step reruns the whole sequence: the gate must still read the prompt alone, not the
    # tokens generated so far (which do change its mix: checked first, so that the comparison can fail).
    with torch.no_grad():
        grown = dict(inputs, input_ids=cached.sequences, attention_mask=torch.ones_like(cached.sequences))
        assert not torch.allclose(model(**grown).alignment_weights, model(**inputs).alignment_weights, atol=1e-3)
    uncached = model.generate(**inputs, use_cache=False, **settings)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(step_uncached, step_cached, atol=1e-5, rtol=1e-5)
    assert cached.sequences.shape[1] == inputs["input_ids"].shape[1] + 10


def test_generate_from_inputs_embeds_equals_generate_from_ids(model, processor, images):
    """As with LLaVA: the prompt's token embeddings (placeholders found by their rows) instead of its ids."""
    sharpen_gate(model)
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    from_ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                 pixel_values=inputs["pixel_values"], max_new_tokens=6, do_sample=False)
    assert from_embeds.tolist() == from_ids.tolist()


def test_concurrent_generate_calls_keep_their_own_prompt(model, processor, images):
    """Two threads generating on one model (a server), uncached: each call's gate reads its own prompt, also when the
    other call starts and ends in the middle of it (made to happen: the first call waits in its first forward)."""
    import threading

    sharpen_gate(model)
    questions = ["What is shown?", "How many squares are there in the image, and what colour are they?"]
    inputs = [processor(images=images[i:i + 1], text=prompts(processor, [q]), return_tensors="pt")
              for i, q in enumerate(questions)]

    def run(row):
        out = model.generate(**inputs[row], max_new_tokens=6, do_sample=False, use_cache=False,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits)

    alone = [run(0), run(1)]
    in_first_forward, other_done, results = threading.Event(), threading.Event(), {}

    def hold_the_first_call(module, args):
        if threading.current_thread().name == "first" and not other_done.is_set():
            in_first_forward.set()
            assert other_done.wait(60)

    handle = model.model.language_model.register_forward_pre_hook(hold_the_first_call)
    try:
        first = threading.Thread(target=lambda: results.update(first=run(0)), name="first")
        first.start()
        assert in_first_forward.wait(60)
        results["second"] = run(1)
        other_done.set()
        first.join(60)
    finally:
        handle.remove()
    for (sequences, logits), (expected_sequences, expected_logits) in zip([results["first"], results["second"]], alone):
        assert torch.equal(sequences, expected_sequences)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["prompt", "conversation"])
def test_gate_prompt_length_scores_an_answer_as_generation_does(model, processor, images, scope):
    """Teacher-forced scoring (prompt + answer in one forward, as lmms-eval's loglikelihood) conditions on the prompt's
    <align> vector when told where the prompt ends: the prompt positions' logits are those of the prompt alone."""
    sharpen_gate(model)
    model.config.gate_text_scope = scope
    prompt = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    prompt_len = prompt["input_ids"].shape[1]
    full_text = processor.apply_chat_template(chat("What is shown?", answer="Two blue squares and a triangle."))
    full = processor(images=images[:1], text=[full_text], return_tensors="pt")
    assert torch.equal(full["input_ids"][:, :prompt_len], prompt["input_ids"])
    with torch.no_grad():
        alone = model(**prompt).logits
        reading_answer = model(**full).logits[:, :prompt_len]
        scored = model(**full, gate_prompt_length=prompt_len).logits[:, :prompt_len]
    assert not torch.allclose(reading_answer, alone, atol=1e-4)  # the answer moves the gate's mix
    torch.testing.assert_close(scored, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="gate_prompt_length must be an int"):
        model(**full, gate_prompt_length=torch.tensor(prompt_len))


def test_labels_supervising_every_token_leave_the_gate_its_text(model, processor, images, caplog):
    """LLaVA-style labels (`input_ids.clone()`, every text token supervised) leave no prompt for the gate's text
    (labels == -100): those rows read all their text, as without labels, with a warning, instead of a constant mix."""
    sharpen_gate(model)
    texts = [processor.apply_chat_template(chat("What is shown?", answer="A red box.")),
             processor.apply_chat_template(chat("How many squares are there?", answer="Two."))]
    batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    with caplog.at_level("WARNING"):
        out = model(**batch, labels=labels)
    assert "its labels supervise every text token" in caplog.text
    out.loss.backward()
    assert model.model.alignment_gate.fc1.weight.grad.abs().max() > 0
    model.eval()
    with torch.no_grad():
        without_labels = model(**batch).alignment_weights
    torch.testing.assert_close(out.alignment_weights.detach(), without_labels)
    assert not torch.allclose(without_labels[0], without_labels[1], atol=1e-3)


def test_batched_left_padded_generation_equals_one_at_a_time(model, processor, images):
    texts = prompts(processor, ["What is shown?", "How many squares are there in the image?"])
    texts += prompts(processor, ["What is 2 plus 3?"], with_image=False)
    row_images = [images[0], images[1]]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=row_images, text=texts, return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, text in enumerate(texts):
        single = processor(images=[row_images[row]] if row < 2 else None, text=text, return_tensors="pt")
        one = model.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1]:]
        assert generated[row].tolist() == one[0].tolist()


def test_sdpa_and_eager_attention_agree(config, processor, images):
    inputs = processor(images=images, text=prompts(processor, ["What is shown?", "Count the squares."]),
                       return_tensors="pt", padding=True)
    logits = {}
    for implementation in ("sdpa", "eager"):
        cfg = copy.deepcopy(config)
        torch.manual_seed(0)
        model = AlignGPTForConditionalGeneration._from_config(cfg, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits["sdpa"][mask], logits["eager"][mask], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients(model, processor, images):
    texts = [processor.apply_chat_template(chat("What is shown?", answer="A red box."))]
    inputs = processor(images=images[:1], text=texts, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.model.language_model.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    assert "model.alignment_gate.fc1.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


def test_labels_never_supervise_placeholders(model, processor, images):
    inputs = processor(images=images[:1], text=["<image>a red box\n"], return_tensors="pt")
    labels = inputs["input_ids"].clone()  # naive labels: every token, placeholders included
    with torch.no_grad():
        out = model(**inputs, labels=labels, alignment_levels=torch.tensor([1]))
        logits = out.logits[0, :-1]
        targets = labels[0, 1:]
        keep = (targets != model.config.image_token_id) & (targets != model.config.alignment_token_id)
        expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    # the same from embeddings (PEFT prompt tuning, or a caller's own embeddings): placeholder targets are found by
    # their label values
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], labels=labels,
                            alignment_levels=torch.tensor([1]))
    torch.testing.assert_close(from_embeds.loss, expected)


def test_placeholder_labels_counted_by_the_trainer_are_refused(model, processor, images):
    """Trainer divides the summed loss by its own count of targets (num_items_in_batch), made before the model drops
    the placeholders: with labels on 2 x 16 <image> tokens the loss would shrink, silently. Refused with the fix."""
    inputs = processor(images=images[:2], text=["<image>a red box\n", "<image>two squares\n"], return_tensors="pt",
                       padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with pytest.raises(ValueError, match=r"mask_placeholders"):
        model(**inputs, labels=labels, alignment_levels=torch.tensor([1, 2]), num_items_in_batch=int(labels.numel()))
    from transformers_aligngpt.collators import mask_placeholders

    masked = mask_placeholders(labels, inputs["input_ids"], processor)
    shifted = masked[:, 1:]
    count = int((shifted != -100).sum())
    with torch.no_grad():
        out = model(**inputs, labels=masked, alignment_levels=torch.tensor([1, 2]), num_items_in_batch=count)
        expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_offloaded_alignment_table_is_loaded_by_its_hook(model, processor, images, tmp_path):
    """device_map offloading (accelerate hooks; "cpu" beside a GPU, or "disk") keeps an offloaded module's weight on
    the meta device outside its own forward: the alignment table must be read through the module."""
    model.save_pretrained(tmp_path / "model")
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    device_map = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector",
                                           "model.alignment_gate", "model.language_model", "lm_head")}
    device_map["model.alignment_embeddings"] = "disk"
    loaded = AlignGPTForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert loaded.model.alignment_embeddings.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
        levels = dict(inputs, alignment_levels=torch.tensor([3]))
        torch.testing.assert_close(loaded(**levels).logits, model(**levels).logits, atol=0, rtol=0)


def test_prompt_gate_scope_ignores_answers(model, processor, images):
    text = processor.apply_chat_template(chat("What is shown?", answer="A red box."))
    inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    prompt = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    prompt_len = prompt["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_len] = -100  # supervise the answer only
    with torch.no_grad():
        model.config.gate_text_scope = "prompt"
        trained_on_prompt = model(**inputs, labels=labels).alignment_weights
        at_inference = model(**prompt).alignment_weights
        model.config.gate_text_scope = "conversation"
        trained_on_all = model(**inputs, labels=labels).alignment_weights
    torch.testing.assert_close(trained_on_prompt, at_inference)
    assert not torch.allclose(trained_on_all, at_inference)
    model.config.gate_text_scope = "prompt"
    with pytest.raises(ValueError, match=r"gate_text_mask must have the shape of input_ids"):
        model(**inputs, gate_text_mask=(labels == -100)[:, :-1])


def test_save_load_round_trip_and_auto_classes(model, processor, images, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_aligngpt.py").exists() and (tmp_path / "configuration_aligngpt.py").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "aligngpt"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is AlignGPTForConditionalGeneration
    inputs = loaded_processor(images=images[:1], text=prompts(loaded_processor, ["What is shown?"]),
                              return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "AlignGPTModel"


def test_device_map_auto_loads_and_matches(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AlignGPTForConditionalGeneration.from_pretrained(tmp_path, device_map="auto").eval()
    # big-model dispatch must never split a decoder or vision layer across devices
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(loaded._no_split_modules)
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_torch_compile_fullgraph(model, processor, images):
    inputs = processor(images=images, text=prompts(processor, ["What is shown?", "Count it."]),
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
        # from inputs_embeds too (the placeholders are found by comparing embeddings, without a host sync)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        torch.testing.assert_close(compiled(inputs_embeds=embeds, **rest).logits, expected, atol=1e-5, rtol=1e-4)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_level_out_of_range_is_rejected(model, processor, images):
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"alignment_levels must lie in 0..7 .*, got \[8\]"):
        model(**inputs, alignment_levels=torch.tensor([8]))


def test_misplaced_align_tokens_and_level_count_are_rejected(model, processor, images):
    align = model.config.alignment_token_id
    inputs = processor(images=images[:1], text=["<image>a box\n", "no image here"], return_tensors="pt",
                       padding=True)
    ids = inputs["input_ids"].clone()
    ids[1, -1] = align  # a text-only row with an <align> token
    with pytest.raises(ValueError, match=r"rows without an image none \(rows \[1\] break this\)"):
        model(**{**inputs, "input_ids": ids})
    ids = inputs["input_ids"].clone()
    ids[0, -1] = align  # a second <align> in the image row
    with pytest.raises(ValueError, match=r"exactly one <align> token.*rows \[0\]"):
        model(**{**inputs, "input_ids": ids})
    # an image row that lost its <align> (truncated from the left elsewhere: bos and <align> cut) is refused as well
    one = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    cut = {**one, "input_ids": one["input_ids"][:, 2:], "attention_mask": one["attention_mask"][:, 2:]}
    assert (cut["input_ids"] == model.config.image_token_id).sum() == model.config.num_image_tokens
    with pytest.raises(ValueError, match=r"exactly one <align> token.*rows \[0\].*truncated from the left"):
        model(**cut)
    with pytest.raises(ValueError, match=r"alignment_levels needs one level per row \(2\), got 1"):
        model(**inputs, alignment_levels=torch.tensor([3]))


def test_levels_are_integer_tensors_read_only_in_rows_with_an_image(model, processor, images):
    texts = ["<image>a box\n", "no image here"]
    inputs = processor(images=images[:1], text=texts, return_tensors="pt", padding=True)
    table = model.model.alignment_embeddings.weight
    align = inputs["input_ids"] == model.config.alignment_token_id
    # a text-only row may hold any level (-1 as a "no level" marker): it has no <align> to fill
    _, embeds = embeddings_seen_by_lm(model, {**inputs, "alignment_levels": torch.tensor([3, -1])})
    torch.testing.assert_close(embeds[align], table[3:4])
    _, text_row = embeddings_seen_by_lm(model, processor(text=texts[1:], return_tensors="pt"))
    torch.testing.assert_close(embeds[1, -text_row.shape[1]:], text_row[0])
    # ... but an image row's level is checked
    with pytest.raises(ValueError, match=r"0..7 in rows with an image.*got \[-1\]"):
        model(**inputs, alignment_levels=torch.tensor([-1, 3]))
    for levels, found in ((torch.tensor([3.0, 0.0]), "torch.float32"), ([3, 0], "list"),
                          (torch.tensor([True, False]), "torch.bool")):
        with pytest.raises(TypeError, match=f"alignment_levels must be an integer tensor.*{found}"):
            model(**inputs, alignment_levels=levels)


def test_past_key_values_keyword_is_the_cache(model, processor, images):
    # transformers 5 renamed `past_key_values` to `cache`; the old name must not be dropped into **kwargs, which
    # would silently compute the step at position 0 without the prompt
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    with torch.no_grad():
        prompt = model(**inputs, use_cache=True)
        token = prompt.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        new_name = model(input_ids=token, attention_mask=mask, cache=copy.deepcopy(prompt.cache)).logits
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_name = model(input_ids=token, attention_mask=mask, past_key_values=copy.deepcopy(prompt.cache)).logits
        alone = model(input_ids=token).logits
    torch.testing.assert_close(old_name, new_name)
    assert not torch.allclose(old_name, alone, atol=1e-3)


def test_generation_modes_that_split_the_prompt_are_refused_and_prompt_lookup_works(model, processor, images):
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=f"prefill_chunk_size=8 would split this {length}-token prompt"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, prefill_chunk_size=8)
    # a chunk that holds the whole prompt splits nothing
    whole = model.generate(**inputs, max_new_tokens=4, do_sample=False, prefill_chunk_size=length)
    assert whole.tolist() == greedy.tolist()
    with pytest.raises(ValueError, match="cannot be the assistant_model"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=model)
    # a text-only draft model works (it gets the model kwargs too, and must not be handed AlignGPT-only ones)
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    draft = LlamaForCausalLM(copy.deepcopy(model.config.text_config)).eval()
    drafted = model.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
    assert drafted.tolist() == greedy.tolist()

    # Prompt lookup proposes the tokens that followed the last generated ones in the prompt: after "USER:", the
    # <image> placeholders. The model verifies them as ordinary tokens (the prompt's images are in the cache), so
    # the output is greedy's. A processor that makes the model say " USER:" first forces such a proposal.
    forced = processor.tokenizer(" USER:", add_special_tokens=False)["input_ids"]

    def say_user_first(ids, scores):
        step = ids.shape[1] - length
        if step < len(forced):
            scores = torch.full_like(scores, -1e9)
            scores[:, forced[step]] = 0
        return scores

    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([say_user_first])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, logits_processor=processors)
    looked_up = model.generate(**inputs, max_new_tokens=6, do_sample=False, logits_processor=processors,
                               prompt_lookup_num_tokens=4)
    assert looked_up.tolist() == expected.tolist()


def test_trainer_predict_and_evaluate_with_metrics_gather_the_outputs(model, processor, images, tmp_path):
    # Trainer gathers every output tensor; the cache and the vision tower's output (a ModelOutput with None
    # fields) must be left out (config.keys_to_ignore_at_inference), or predict() fails in `_pad_across_processes`
    from transformers import Trainer, TrainingArguments

    batch = processor(images=images[:2], text=prompts(processor, ["What is shown?", "Which colour?"]),
                      return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -1] = batch["input_ids"][:, -1]  # (the rest is prompt, which the gate reads)
    rows = [{key: value[row] for key, value in batch.items()} | {"labels": labels[row]} for row in range(2)]
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    seen = {}

    def metrics(prediction):
        seen["shapes"] = [tuple(array.shape) for array in prediction.predictions]
        return {"rows": len(prediction.label_ids)}

    trainer = Trainer(model=model, args=args, eval_dataset=rows, compute_metrics=metrics)
    assert trainer.evaluate()["eval_rows"] == 2
    logits_shape = (2, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert seen["shapes"] == [logits_shape, (2, model.config.num_alignment_levels - 1)]  # logits, alignment_weights
    predicted = trainer.predict(rows)
    with torch.no_grad():
        expected = model(**batch, labels=labels)
    torch.testing.assert_close(torch.from_numpy(predicted.predictions[1]), expected.alignment_weights)
    torch.testing.assert_close(torch.from_numpy(predicted.predictions[0]), expected.logits)


def test_a_per_call_feature_strategy_that_changes_the_feature_count_is_rejected(model, processor, images):
    # "full" keeps CLS: 17 features per image for 16 <image> tokens. Without the check the one-row merge would write
    # the 17th over the next text token (and without the gate, nothing else would notice)
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    for kwargs in ({}, {"alignment_levels": torch.tensor([2])}):
        with pytest.raises(ValueError, match="vision tower gave 17 features per image, but the prompt holds 16"):
            model(**inputs, vision_feature_select_strategy="full", **kwargs)


def test_placeholder_feature_mismatch_is_rejected(model, processor, images):
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    cut = {k: v[:, :-6] if k != "pixel_values" else v for k, v in inputs.items()}
    cut["input_ids"] = torch.cat([inputs["input_ids"][:, :5], inputs["input_ids"][:, 10:]], dim=1)
    cut["attention_mask"] = torch.ones_like(cut["input_ids"])
    with pytest.raises(ValueError, match=r"does not match the images: 11 <image> tokens for 1 images, which need 1 x 16"):
        model(**cut)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize(
    "edits, error",
    [
        ({"alignment_mode": "fixed", "fixed_alignment_level": 99}, r"fixed_alignment_level in 0..7, got 99"),
        ({"alignment_mode": "fixed", "fixed_alignment_level": None}, r"fixed_alignment_level in 0..7, got None"),
        ({"alignment_mode": "sometimes"}, r"Unknown alignment_mode 'sometimes'; choose one of adaptive, global"),
        ({"gate_text_scope": "answers"}, r"Unknown gate_text_scope 'answers'; choose one of prompt, conversation"),
    ],
)
def test_config_edited_after_loading_is_checked_again(model, processor, images, edits, error):
    # the forward checks these where it reads them (validate_alignment ran at init, before the edit)
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    saved = {name: getattr(model.config, name) for name in edits}
    for name, value in edits.items():
        setattr(model.config, name, value)
    try:
        with pytest.raises(ValueError, match=error):
            model(**inputs)
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)
    model(**inputs)  # and the restored config works again


def test_config_fields_read_past_attribute_map_are_read_live_and_never_aliased(model, processor, images):
    from transformers_aligngpt import modeling_aligngpt

    # `_config_field` skips PreTrainedConfig's attribute_map lookup, which is only right for fields nothing aliases
    fields = set(re.findall(r'_config_field\(\w+(?:\.config)?, "(\w+)"\)', inspect.getsource(modeling_aligngpt)))
    assert fields >= {"image_token_id", "alignment_token_id", "alignment_mode", "gate_text_scope"}
    assert not fields & (set(model.config.attribute_map) | set(model.config.attribute_map.values()))
    # and it reads the config as it is now: an edited placeholder id is the one the forward looks for
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    saved = model.config.image_token_id
    model.config.image_token_id = model.config.alignment_token_id + 1
    try:
        with pytest.raises(ValueError, match="image"):
            model(**inputs)
    finally:
        model.config.image_token_id = saved
    model(**inputs)


def test_an_unknown_vision_feature_select_strategy_is_rejected(model, processor, images):
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"select feature strategy: cls"):  # (transformers' check)
        model(**inputs, vision_feature_select_strategy="cls")


def test_pixel_values_with_the_wrong_channel_count_are_rejected(model, processor, images):
    inputs = processor(images=images[:1], text=["<image>a box\n"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 16, 16\).*got \(1, 1, 16, 16\)"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :1]})


def test_inputs_embeds_find_the_placeholders_unless_their_rows_are_identical(model, processor, images):
    inputs = processor(images=images[:2], text=["<image>a box\n", "two <image> cats\n"], return_tensors="pt",
                       padding=True)
    expected = model(**inputs).logits
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    torch.testing.assert_close(model(inputs_embeds=embeds, **rest).logits, expected)
    weight = model.get_input_embeddings().weight
    image_id, align_id = model.config.image_token_id, model.config.alignment_token_id
    saved = weight[align_id].detach().clone()
    with torch.no_grad():
        weight[align_id] = weight[image_id]
    try:
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="<image> and <align> rows of the input embeddings are identical"):
            model(inputs_embeds=embeds, **rest)
    finally:
        with torch.no_grad():
            weight[align_id] = saved


def test_unknown_alignment_mode_and_bad_fixed_level(config):
    with pytest.raises(ValueError, match="Unknown alignment_mode 'sometimes'"):
        AlignGPTConfig(vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
                       alignment_mode="sometimes")
    with pytest.raises(ValueError, match="fixed_alignment_level"):
        AlignGPTConfig(alignment_mode="fixed")
    # a whole CLIPConfig (what CLIPConfig.from_pretrained gives) instead of its vision part
    from transformers import CLIPConfig

    with pytest.raises(ValueError, match=r"pass its vision part, e.g. CLIPConfig.from_pretrained\(...\).vision_config"):
        AlignGPTConfig(vision_config=CLIPConfig(), text_config=config.text_config.to_dict())
    # a zero-width gate would build, and mix the levels uniformly whatever the prompt
    with pytest.raises(ValueError, match="alignment_gate_hidden_size must be a positive int"):
        AlignGPTConfig(alignment_gate_hidden_size=0)


def test_gate_width_follows_the_vision_config():
    clip = AlignGPTConfig()
    assert clip.num_image_tokens == 576
    siglip = AlignGPTConfig(
        vision_config={"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14},
        vision_feature_select_strategy="full",
        num_alignment_levels=5,
    )
    assert siglip.num_image_tokens == 729
    full = AlignGPTConfig(vision_feature_select_strategy="full")
    assert full.num_image_tokens == 577


@pytest.mark.parametrize("text_model", ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_other_backbones_and_towers(tokenizer, images, text_model, tower):
    from transformers import AutoConfig, SiglipVisionConfig

    from transformers_aligngpt.tiny import build_processor, tiny_config

    text_kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if text_model == "phi":
        text_kwargs.pop("num_key_value_heads")
    if text_model in ("gemma", "gemma2"):
        text_kwargs["head_dim"] = 16
    vision = None
    if tower == "siglip":  # no CLS token: keep every patch
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=24, patch_size=4)
    config = tiny_config(tokenizer, text_config=AutoConfig.for_model(text_model, **text_kwargs),
                         vision_config=vision, vision_feature_select_strategy="full" if vision else "default")
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).eval()
    processor = build_processor(tokenizer, config)
    assert model.model.alignment_gate.fc1.in_features == config.num_image_tokens == (36 if vision else 16)
    text = prompts(processor, ["What is shown?"])
    inputs = processor(images=images[:1], text=text, return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_id).sum() == config.num_image_tokens
    out = model(**inputs)
    assert out.alignment_weights.shape == (1, 7)
    torch.testing.assert_close(out.alignment_weights.sum(-1), torch.ones(1))
    cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    # the static cache, on a left-padded batch: LMs with `layer_types` (Qwen2, Gemma2) then get a dict of masks
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images[:2], text=prompts(processor, ["What is shown?", "Which colour is it?"]),
                      return_tensors="pt", padding=True)
    dynamic = model.generate(**batch, max_new_tokens=4, do_sample=False)
    static = model.generate(**batch, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


def test_final_logit_softcapping_as_the_language_models_own_head(tokenizer):
    # Gemma 2's causal-LM head caps its logits (tanh(x / c) * c); AlignGPT's head must too, or the loss and sampling
    # differ from the language model's: text-only logits equal Gemma2ForCausalLM's with the same weights
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from transformers_aligngpt.tiny import tiny_config

    text = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=3, bos_token_id=1,
                        eos_token_id=2, final_logit_softcapping=0.2)
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(tiny_config(tokenizer, text_config=text)).eval()
    reference = Gemma2ForCausalLM(text).eval()
    reference.model.load_state_dict(model.model.language_model.state_dict())
    reference.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
        uncapped = model.lm_head(model.model(input_ids=ids).last_hidden_state)
    assert expected.abs().max() < 0.2 < uncapped.abs().max()  # (the cap changes these logits)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading_runs(model, processor, images, tmp_path, dtype):
    """fp16 loading keeps the projector, gate and alignment table in fp32 (`_keep_in_fp32_modules`): mixed dtypes
    must still run, and stay close to the fp32 model."""
    model.save_pretrained(tmp_path)
    half = AlignGPTForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.model.language_model.dtype == dtype
    inputs = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    with torch.no_grad():
        logits = half(**inputs).logits.float()
        expected = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.1
    half.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_forward_signature_is_the_real_one(model):
    # generate() inspects forward's signature at every step; it is precomputed once (modeling_aligngpt) and must
    # stay the signature of the code
    import inspect

    names = list(inspect.signature(model.forward).parameters)
    code = inspect.unwrap(AlignGPTForConditionalGeneration.forward).__code__
    expected = [n for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount] if n != "self"] + ["kwargs"]
    assert names == expected
    assert {"cache", "alignment_levels", "mm_encoder_outputs", "logits_to_keep"} <= set(names)


@pytest.mark.parametrize("adjacent", [True, False])
def test_suppressed_placeholder_logits(model, processor, adjacent):
    config = model.config
    inputs = processor(text=["What is 2 plus 3?"], return_tensors="pt")
    saved = (config.suppress_placeholder_logits, config.alignment_token_id)
    try:
        if not adjacent:
            config.alignment_token_id = config.image_token_id + 3  # not side by side
        assert (abs(config.alignment_token_id - config.image_token_id) == 1) is adjacent
        plain = model(**inputs).logits.detach()
        config.suppress_placeholder_logits = True
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()  # the in-place fill keeps the LM head differentiable
        placeholders = [config.image_token_id, config.alignment_token_id]
        assert (out.logits[..., placeholders] == torch.finfo(out.logits.dtype).min).all()
        keep = torch.ones(plain.shape[-1], dtype=torch.bool)
        keep[placeholders] = False
        torch.testing.assert_close(out.logits.detach()[..., keep], plain[..., keep])
        assert model.lm_head.weight.grad is not None
    finally:
        config.suppress_placeholder_logits, config.alignment_token_id = saved
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("loss_kind", ["cross_entropy", "raw_logits"])
@pytest.mark.parametrize("adjacent", [True, False])
def test_suppressed_columns_backward_equals_an_out_of_place_fill(loss_kind, adjacent):
    # the CPU fill skips autograd's full-gradient copy when the filled columns' gradient is zero (cross-entropy);
    # gradients must equal those of an out-of-place fill whatever the loss (an independent computation)
    from transformers_aligngpt.modeling_aligngpt import suppress_placeholder_columns

    torch.manual_seed(0)
    image_id, align_id = (10, 11) if adjacent else (9, 3)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    labels[labels == 3] = 4  # targets are never placeholders
    upstream = torch.randn(2, 5, 12)

    def grads(fill):
        logits = fill(F.linear(hidden, weight))
        if loss_kind == "cross_entropy":
            F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        else:  # a gradient on every column, the filled ones included
            logits.backward(upstream)
        out = (logits.detach().clone(), hidden.grad.clone(), weight.grad.clone())
        hidden.grad, weight.grad = None, None
        return out, logits.grad_fn

    lowest = torch.finfo(torch.float32).min
    reference, _ = grads(lambda x: x.index_fill(-1, torch.tensor([image_id, align_id]), lowest))
    ours, grad_fn = grads(lambda x: suppress_placeholder_columns(x, image_id, align_id))
    assert "FillColumnsSkippingZeroGrad" in type(grad_fn).__name__  # the custom backward ran, not the fallback
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (ours[0][..., [image_id, align_id]] == lowest).all()


@pytest.mark.parametrize("with_levels", [False, True])
def test_text_only_batch_in_distributed_training_runs_the_image_branch_for_zero(
    model, processor, monkeypatch, with_levels
):
    # DeepSpeed ZeRO-3 hangs when one process skips modules the others run: a text-only batch then runs the
    # image branch on a blank image, adding exactly 0 (outputs unchanged, the branch's modules get gradients)
    inputs = processor(text=["What is 2 plus 3?"], return_tensors="pt")
    extra = {"alignment_levels": torch.tensor([2])} if with_levels else {}
    model.train()
    try:
        expected = model(**inputs, **extra).logits.detach()
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(type(model.model), "_is_distributed_training", lambda self: True)
        out = model(**inputs, **extra)
        torch.testing.assert_close(out.logits.detach(), expected, rtol=0, atol=0)
        out.logits.sum().backward()
        inner = model.model
        assert inner.multi_modal_projector.linear_1.weight.grad is not None
        branch = inner.alignment_embeddings if with_levels else inner.alignment_gate.fc1
        assert branch.weight.grad is not None
        assert not branch.weight.grad.any()  # 0 x the branch: nothing learnt from a text-only batch
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_gate_text_counts_stay_exact_with_a_half_precision_attention_mask(model, images, processor):
    # 303 text tokens after <align>: a bf16 sum of 0/1 values would round the count to 304, and the gate's text mean
    # (divided by the count taken from the placeholder check's host copy) would drift from the int-mask forward
    config = model.config
    pixel_values = processor(images=images[:1], text=prompts(processor, ["Hi"]), return_tensors="pt")["pixel_values"]
    text = torch.randint(5, config.text_config.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    text = text[(text != config.image_token_id) & (text != config.alignment_token_id)][:303]
    assert len(text) == 303
    input_ids = torch.cat([
        torch.tensor([1, config.alignment_token_id]), torch.full((config.num_image_tokens,), config.image_token_id),
        text,
    ]).unsqueeze(0)
    inner = model.model
    image_mask, align_mask = inner.get_placeholder_masks(input_ids, None)
    for dtype in (torch.long, torch.bfloat16, torch.float16):
        mask = torch.ones_like(input_ids, dtype=dtype)
        gate_text = inner.gate_text_tokens(image_mask, align_mask, mask, None)
        assert not gate_text.is_floating_point()
        assert inner.check_placeholders(image_mask, align_mask, 1, config.num_image_tokens, None, gate_text) == [303]
    with torch.no_grad():
        exact = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))
        half = model(input_ids=input_ids, pixel_values=pixel_values,
                     attention_mask=torch.ones_like(input_ids, dtype=torch.bfloat16))
    _, expected_weights, _ = reference_alignment_vector(model, input_ids, pixel_values)
    torch.testing.assert_close(exact.alignment_weights, expected_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(half.alignment_weights, exact.alignment_weights, atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_placeholder_bookkeeping_on_the_host_equals_the_device_path(model, processor, images, monkeypatch,
                                                                     padding_side):
    # The eager forward locates placeholders, checks them and builds the gate's text tokens on the CPU (fewer device
    # ops); traced forwards and TRANSFORMERS_DISABLE_TORCH_CHECK=1 do it on the device. Both must feed the model the
    # same masks, gate tokens and counts, for padded rows with 2, 0 and 1 images, with the prompt-only gate scope.
    def chat_row(n, question, answer):
        content = [{"type": "image"}] * n + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content},
                                              {"role": "assistant", "content": answer}])

    texts = [chat_row(2, "Compare the two pictures.", "Both are squares."), chat_row(0, "What is 2 plus 3?", "5"),
             chat_row(1, "What colour is it?", "Red, mostly, with a darker border.")]
    processor.tokenizer.padding_side = padding_side
    try:
        batch = processor(images=images[:2] + images[1:2], text=texts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = -100
    inner, ids, mask = model.model, batch["input_ids"], batch["attention_mask"]
    prompt = labels == -100
    embeds = inner.get_input_embeddings()(ids)
    num_patches = model.config.num_image_tokens
    host = inner.locate_placeholders(ids, embeds, mask, prompt, None, 3, num_patches, True)
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    device = inner.locate_placeholders(ids, embeds, mask, prompt, None, 3, num_patches, True)
    assert host.gate_text.dtype == embeds.dtype and device.gate_text_counts is None and host.spans is None
    for name in ("image_mask", "align_mask", "gate_text"):
        on_host, on_device = getattr(host, name), getattr(device, name)
        assert torch.equal(on_host, on_device.to(on_host.dtype))
    assert host.gate_text_counts == device.gate_text.sum(-1).tolist()
    assert all(count > 0 for count in host.gate_text_counts[::2])
    # a floating-point padding mask (as some pipelines build it) is read as bool on the host path too
    monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK")
    float_mask = inner.locate_placeholders(ids, embeds, mask.float(), prompt, None, 3, num_patches, True)
    assert torch.equal(float_mask.gate_text, host.gate_text) and float_mask.gate_text_counts == host.gate_text_counts
    # each row alone (the host path's one-row way, by positions), with and without the masks the gate reads
    for row, num_images in enumerate((2, 0, 1)):
        for row_mask, row_prompt in ((mask, prompt), (mask.float(), None), (None, prompt), (None, None)):
            args = [value[row : row + 1] if value is not None else None for value in (ids, embeds, row_mask, row_prompt)]
            monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK", raising=False)
            one_host = inner.locate_placeholders(*args[:2], args[2], args[3], None, num_images, num_patches, True)
            monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
            one_device = inner.locate_placeholders(*args[:2], args[2], args[3], None, num_images, num_patches, True)
            # with images and no mask cutting the text after <align>: runs of positions instead of a 0/1 vector
            cut = (row_prompt is not None or padding_side == "right" and row_mask is not None
                   and not bool(row_mask[row, -1]))
            assert (one_host.gate_text_runs is not None) == (num_images > 0 and not cut)
            host_text = one_host.gate_text
            if one_host.gate_text_runs is not None:
                assert one_host.gate_text is None
                host_text = torch.zeros_like(one_device.gate_text, dtype=embeds.dtype)
                for start, end in one_host.gate_text_runs:
                    host_text[0, start:end] = 1
            assert torch.equal(host_text, one_device.gate_text.to(host_text.dtype))
            assert one_host.gate_text_counts == one_device.gate_text.sum(-1).tolist()
            if row_mask is mask and row_prompt is prompt:
                assert one_host.gate_text_counts == host.gate_text_counts[row : row + 1]
            if num_images:  # one run of P tokens per image: spans, which test_one_row_merge_... checks
                assert one_host.spans is not None and len(one_host.spans) == num_images + 1
            else:  # no image: masks, all False, as on the device
                assert one_host.spans is None and not one_host.image_mask.any() and not one_host.align_mask.any()
    monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK")
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    with torch.no_grad():
        from_device = model(**batch, labels=labels)
        monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK")
        from_host = model(**batch, labels=labels)
        one_row = {key: value[2:] for key, value in batch.items() if key != "pixel_values"}
        one_row_host = model(**one_row, pixel_values=batch["pixel_values"][2:])
        monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        one_row_device = model(**one_row, pixel_values=batch["pixel_values"][2:])
    torch.testing.assert_close(from_host.logits, from_device.logits, atol=0, rtol=0)
    torch.testing.assert_close(from_host.alignment_weights, from_device.alignment_weights, atol=0, rtol=0)
    # one row: the host count makes the text mean one baddbmm; the device path divides by a device sum
    torch.testing.assert_close(one_row_host.alignment_weights, one_row_device.alignment_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one_row_host.logits, one_row_device.logits, atol=1e-5, rtol=1e-5)


def test_one_row_without_text_after_align_gives_the_gate_a_zero_text_mean(model, processor, images, monkeypatch):
    # [bos, <align>, <image> x P] and nothing after: no text tokens, no runs; both paths read a zero text mean
    inputs = processor(images=images[:1], text=["<image>"], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 2 + model.config.num_image_tokens
    inner = model.model
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    layout = inner.locate_placeholders(inputs["input_ids"], embeds, inputs["attention_mask"], None, None, 1,
                                       model.config.num_image_tokens, True)
    assert layout.gate_text_runs == [] and layout.gate_text_counts == [0]
    with torch.no_grad():
        on_host = model(**inputs)
        monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        on_device = model(**inputs)
    assert torch.isfinite(on_host.logits).all()
    torch.testing.assert_close(on_host.alignment_weights, on_device.alignment_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(on_host.logits, on_device.logits, atol=1e-5, rtol=1e-5)


def test_one_row_merge_by_slices_equals_the_masked_merge(model, processor, images, monkeypatch):
    # One row whose images are runs of P tokens: the host path merges with one torch.cat of slices; the device path
    # (TRANSFORMERS_DISABLE_TORCH_CHECK=1) with masked_scatter + where. The embeddings the LM sees must be identical
    # (alignment_mode="global": the same alignment vector on both paths, so the merge alone is compared), for one
    # and for two images; images whose tokens are not one run fall back to the masked merge.
    def lm_inputs(batch):
        with torch.no_grad():
            return embeddings_seen_by_lm(model, batch)[1]

    one = processor(images=images[:1], text=prompts(processor, ["What is shown?"]), return_tensors="pt")
    two = processor(images=images[:2], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                      {"type": "text", "text": "Compare them."}]}], add_generation_prompt=True)],
        return_tensors="pt")
    # the first image's tokens split in two runs by a text token
    split = {key: value.clone() for key, value in one.items()}
    ids = split["input_ids"][0]
    first = int((ids == model.config.image_token_id).nonzero()[0, 0])
    half = model.config.num_image_tokens // 2
    split["input_ids"] = torch.cat([ids[:first + half], ids[-1:], ids[first + half:]]).unsqueeze(0)
    split["attention_mask"] = torch.ones_like(split["input_ids"])
    inner = model.model
    layouts = [inner.locate_placeholders(b["input_ids"], inner.get_input_embeddings()(b["input_ids"]),
                                         b["attention_mask"], None, None, len(b["pixel_values"]),
                                         model.config.num_image_tokens, True) for b in (one, two, split)]
    assert [len(layout.spans or []) for layout in layouts] == [2, 3, 0]
    assert layouts[0].image_mask is None and layouts[2].image_mask is not None
    mode = model.config.alignment_mode
    model.config.alignment_mode = "global"
    try:
        on_host = [lm_inputs(b) for b in (one, two, split)]
        monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        on_device = [lm_inputs(b) for b in (one, two, split)]
    finally:
        model.config.alignment_mode = mode
    for host_embeds, device_embeds in zip(on_host, on_device):
        assert torch.equal(host_embeds, device_embeds)

    # and the same gradients through the merge (projector, alignment table, text embeddings)
    def grads(batch):
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        inner = model.model
        return [inner.multi_modal_projector.linear_2.weight.grad.clone(),
                inner.alignment_embeddings.weight.grad.clone(), inner.get_input_embeddings().weight.grad.clone()]

    model.config.alignment_mode = "global"
    try:
        masked = grads(one)
        monkeypatch.delenv("TRANSFORMERS_DISABLE_TORCH_CHECK")
        sliced = grads(one)
    finally:
        model.config.alignment_mode = mode
        model.zero_grad(set_to_none=True)
    for grad_sliced, grad_masked in zip(sliced, masked):
        assert grad_sliced.abs().sum() > 0
        torch.testing.assert_close(grad_sliced, grad_masked, atol=0, rtol=0)
