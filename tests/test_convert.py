"""The converter of original-format checkpoints, against the fixture's reference numbers (float32) and against an
independent re-implementation of the original forward pass for variants that are not in the repository.

Reference numbers: `../shared/fixtures/aligngpt-original-tiny` (see its README). The original runs
`[bos, alignment vector, text, image features at the -200 position, text]`; our ids are
`[bos, <align>, text, <image> x num_image_tokens, text]` (`convert_original_sequence`), the same length.
"""

import argparse
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import transformers_aligngpt  # noqa: F401  (registers the Auto classes)
from transformers_aligngpt.convert import (
    ConversionError,
    add_convert_subparser,
    convert_checkpoint,
    convert_original_sequence,
    convert_pretrain_artefact,
    fresh_gate_state_dict,
    main,
    run_convert,
)

ORIGINAL_VOCAB = 400
LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# an independent re-implementation of the original forward pass
# ---------------------------------------------------------------------------------------------------------------


def read_original_weights(folder):
    """The original checkpoint's tensors, read directly (index + shards, .bin or .safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for index in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            break
    else:
        shards = [p.name for p in folder.iterdir() if p.name in ("pytorch_model.bin", "model.safetensors")]
    state_dict = {}
    for shard in shards:
        path = folder / shard
        state_dict.update(load_file(path) if shard.endswith(".safetensors") else torch.load(path, weights_only=True))
    return state_dict


class OriginalAlignGPT:
    """The original model's computation, written from the fixture README: Llama (transformers `LlamaForCausalLM`
    with the checkpoint's LM keys), the CLIP tower reloaded from its folder (as the original does), and the
    projector, alignment embeddings and gate by hand from the original state dict."""

    def __init__(self, config: dict, state_dict: dict, vision_tower_dir):
        llama_config = LlamaConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)},
        )
        self.llm = LlamaForCausalLM(llama_config).eval()
        lm_prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
        lm_keys = {k: v for k, v in state_dict.items() if k.startswith(lm_prefixes) and "rotary_emb" not in k}
        self.llm.load_state_dict(lm_keys, strict=True)
        self.tower = CLIPVisionModel.from_pretrained(vision_tower_dir).eval()
        self.select_layer = config["mm_vision_select_layer"]
        self.select_feature = config["mm_vision_select_feature"]
        self.projector = {k.split("mm_projector.")[1]: v for k, v in state_dict.items() if "mm_projector." in k}
        self.levels = state_dict["align_indicators.indicator_embs"]
        self.gate = {k.split("gated_weight_layer.mlp.")[1]: v for k, v in state_dict.items() if "gated_weight" in k}

    def image_features(self, pixel_values):
        hidden = self.tower(pixel_values[None], output_hidden_states=True).hidden_states[self.select_layer][0]
        if self.select_feature == "patch":
            hidden = hidden[1:]
        p = self.projector
        if "0.weight" in p:  # mlp2x_gelu
            return F.linear(F.gelu(F.linear(hidden, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        return F.linear(hidden, p["weight"], p["bias"])

    def alignment_vector(self, features, text_embeds, level=None):
        if level is not None:
            return self.levels[level]
        affinity = features @ text_embeds.mean(0)
        g = self.gate
        hidden = F.gelu(F.linear(affinity, g["0.weight"], g["0.bias"]))
        weights = torch.softmax(F.linear(hidden, g["2.weight"], g["2.bias"]), -1)
        return self.levels[-1] + weights @ self.levels[:-1]

    @torch.no_grad()
    def __call__(self, ids, pixel_values=None, level=None, labels=None, vector=None, features=None):
        """Logits (and loss) over `[bos, alignment vector, text, features, text]`; the gate reads every text token
        after bos of `ids` (prompt only at inference, answers included in training). `vector` overrides it."""
        embed = self.llm.get_input_embeddings()
        if -200 not in ids:
            sequence, expanded = embed(torch.tensor(ids)), labels
        else:
            k = ids.index(-200)
            before, after = embed(torch.tensor(ids[:k])), embed(torch.tensor(ids[k + 1:]))
            if features is None:
                features = self.image_features(pixel_values)
            if vector is None:
                vector = self.alignment_vector(features, torch.cat([before[1:], after]), level)
            sequence = torch.cat([before[:1], vector[None], before[1:], features, after])
            if labels is not None:
                expanded = [labels[0], -100] + labels[1:k] + [-100] * len(features) + labels[k + 1:]
        logits = self.llm(inputs_embeds=sequence[None]).logits[0]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:-1], torch.tensor(expanded[1:]), ignore_index=-100)
        return logits, loss, vector

    def greedy(self, ids, pixel_values, max_new_tokens):
        """Greedy decoding; the alignment vector is the prompt's (computed once, as with the original's KV cache)."""
        ids = list(ids)
        vector = None
        new = []
        with torch.no_grad():
            features = self.image_features(pixel_values)
        for _ in range(max_new_tokens):
            logits, _, vector = self(ids, vector=vector, features=features)
            new.append(int(logits[-1].argmax()))
            ids.append(new[-1])
        return new


def ours(ids, config, labels=None):
    """Original-format ids (and labels) -> this package's layout, as tensors with a batch dimension."""
    converted = convert_original_sequence(
        ids, labels, image_token_id=config.image_token_id, alignment_token_id=config.alignment_token_id,
        num_image_tokens=config.num_image_tokens,
    )
    if labels is None:
        return torch.tensor([converted]), None
    return torch.tensor([converted[0]]), torch.tensor([converted[1]])


def max_diff(a, b):
    return (a[..., :ORIGINAL_VOCAB].float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# the fixture checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(converted_original_dir):
    model = AutoModelForImageTextToText.from_pretrained(converted_original_dir).eval()
    processor = AutoProcessor.from_pretrained(converted_original_dir)
    return model, processor


@pytest.fixture(scope="module")
def fixture_images(original_fixture_dir, original_reference):
    reference, _ = original_reference
    return [Image.open(original_fixture_dir / "images" / name).convert("RGB") for name in reference["image_files"]]


def test_converted_folder(original_fixture_dir, converted_original_dir, converted):
    model, processor = converted
    files = {p.name for p in converted_original_dir.iterdir()}
    # the card facts `aligngpt push --model FOLDER` will use: where the weights come from, named as given
    card_info = json.loads((converted_original_dir / "aligngpt_card_info.json").read_text())
    source = str(original_fixture_dir / "checkpoint")
    assert card_info["summary"].startswith(f"Converted from the original AlignGPT release format (`{source}`)")
    assert card_info["source"] == {"converted_from": source}
    # the fixture's config names no base LLM and its tower by a path: no license or base model is guessed
    assert "license" not in card_info and card_info["base_models"] == []
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json"} <= files
    config = model.config
    assert (config.image_token_id, config.alignment_token_id) == (400, 401)
    assert config.text_config.vocab_size == 402 and model.lm_head.weight.shape[0] == 402
    assert config.gate_text_scope == "conversation" and config.alignment_mode == "adaptive"
    assert config.projector_type == "mlp2x_gelu" and config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default" and config.num_image_tokens == 576
    assert (config.num_alignment_levels, config.alignment_gate_hidden_size) == (8, 256)
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"
    assert (tokenizer.image_token, tokenizer.alignment_token) == ("<image>", "<align>")
    # every chunk between special tokens gets its own "▁" (the original tokenises around <image> chunk by chunk),
    # and that survives saving: `legacy=True` is in tokenizer_config.json
    assert tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "always"
    assert json.loads((converted_original_dir / "tokenizer_config.json").read_text())["legacy"] is True
    assert processor.image_processor.do_pad
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    # new rows: the mean of the original ones, the second moved by a tenth of their spread, so that <image> and
    # <align> differ (inputs_embeds are searched for their rows)
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        torch.testing.assert_close(weight[400], weight[:400].mean(0))
        torch.testing.assert_close(weight[401], weight[:400].mean(0) + weight[:400].std(0) / 10)
        assert not torch.equal(weight[400], weight[401])


def test_weights_are_the_original_ones(original_fixture_dir, converted):
    model, _ = converted
    original = read_original_weights(original_fixture_dir / "checkpoint")
    ours_ = model.state_dict()
    pairs = {
        "model.embed_tokens.weight": ("model.language_model.embed_tokens.weight", slice(0, 400)),
        "lm_head.weight": ("lm_head.weight", slice(0, 400)),
        "model.layers.1.mlp.down_proj.weight": ("model.language_model.layers.1.mlp.down_proj.weight", None),
        "mm_projector.2.bias": ("model.multi_modal_projector.linear_2.bias", None),
        "align_indicators.indicator_embs": ("model.alignment_embeddings.weight", None),
        "gated_weight_layer.mlp.0.weight": ("model.alignment_gate.fc1.weight", None),
        "vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight":
            ("model.vision_tower.encoder.layers.2.mlp.fc1.weight", None),
    }
    for key, (new_key, rows) in pairs.items():
        value = ours_[new_key] if rows is None else ours_[new_key][rows]
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("row", [0, 1])
def test_image_prompt_logits_match_reference(converted, original_reference, row):
    model, _ = converted
    reference, tensors = original_reference
    input_ids, _ = ours(reference["input_ids"][row], model.config)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=tensors["pixel_values"][row:row + 1]).logits[0]
    expected = tensors[f"inference_logits_{row}"]
    assert logits.shape[0] == expected.shape[0]
    diff = max_diff(logits, expected)
    print(f"image prompt {row}: max abs logit difference {diff:.3g}")
    assert diff <= LOGITS_ATOL


def test_text_only_logits_match_reference(converted, original_reference):
    model, _ = converted
    reference, tensors = original_reference
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["text_only_input_ids"]])).logits[0]
    diff = max_diff(logits, tensors["text_only_logits"])
    print(f"text-only prompt: max abs logit difference {diff:.3g}")
    assert diff <= LOGITS_ATOL


def test_pretraining_losses_match_reference(converted, original_reference):
    model, _ = converted
    reference, tensors = original_reference
    for row, sample in enumerate(reference["pretrain"]):
        input_ids, labels = ours(sample["input_ids"], model.config, sample["labels"])
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels, pixel_values=tensors["pixel_values"][row:row + 1],
                         alignment_levels=torch.tensor([sample["alignment_level"]])).loss
        print(f"pretrain {row}: loss {loss.item():.7f} reference {sample['loss']:.7f}")
        assert abs(loss.item() - sample["loss"]) <= LOSS_ATOL


def test_instruction_tuning_losses_match_reference(converted, original_reference):
    model, _ = converted
    reference, tensors = original_reference
    for row, sample in enumerate(reference["finetune"]):
        input_ids, labels = ours(sample["input_ids"], model.config, sample["labels"])
        batch = dict(input_ids=input_ids, labels=labels, pixel_values=tensors["pixel_values"][row:row + 1])
        with torch.no_grad():
            out = model(**batch)
            # the consistent variant leaves the answer out of the gate's text mean: other gate weights (the
            # fixture's gate is nearly flat, so the loss barely moves; the variant below shows it in the loss)
            model.config.gate_text_scope = "prompt"
            try:
                prompt_scope = model(**batch)
            finally:
                model.config.gate_text_scope = "conversation"
        print(f"finetune {row}: loss {out.loss.item():.7f} reference {sample['loss']:.7f}")
        assert abs(out.loss.item() - sample["loss"]) <= LOSS_ATOL
        assert (out.alignment_weights - prompt_scope.alignment_weights).abs().max() > 1e-6


def test_processor_pixel_values_match_reference(converted, original_reference, fixture_images):
    _, processor = converted
    _, tensors = original_reference
    pixel_values = processor.image_processor(fixture_images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == tensors["pixel_values"].shape
    assert (pixel_values - tensors["pixel_values"]).abs().max().item() <= 1e-5


def reference_messages(prompt):
    """The user question inside a reference prompt, as chat messages."""
    question = prompt.split("USER: <image>\n", 1)[1].rsplit(" ASSISTANT:", 1)[0]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("row", [0, 1])
def test_processor_reproduces_prompt_and_ids_and_generation(converted, original_reference, fixture_images, row):
    model, processor = converted
    reference, tensors = original_reference
    prompt = processor.apply_chat_template(reference_messages(reference["prompts"][row]), add_generation_prompt=True)
    assert prompt == reference["prompts"][row]
    inputs = processor(images=fixture_images[row], text=prompt, return_tensors="pt")
    expected_ids, _ = ours(reference["input_ids"][row], model.config)
    assert inputs["input_ids"].tolist() == expected_ids.tolist()
    assert (inputs["pixel_values"] - tensors["pixel_values"][row:row + 1]).abs().max().item() <= 1e-5
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    original = reference["inference_generated_ids"][row][len(reference["input_ids"][row]):]
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == original
    # Prompt lookup: the prompt ends in ":", whose first occurrence ("USER:") the <image> run follows, so its first
    # candidates are <image> ids, run with the prompt in one forward: tokens there, and out of the gate's text
    looked_up = model.generate(**inputs, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert looked_up[0, inputs["input_ids"].shape[1]:].tolist() == original


@pytest.mark.parametrize("layout", ["messages", "prompt_completion"])
def test_instruction_collator_gives_the_original_ids_and_labels(converted, original_reference, fixture_images, layout):
    """Phase-2 batches of the fixture's two chats, through the package's collator (TRL's, plus AlignGPT's masks),
    hold the original's tokens and labels: the answer's first token, the "▁" that sentencepiece gives the space after
    "ASSISTANT:", supervised as the original supervises it."""
    from transformers_aligngpt.collators import AlignGPTInstructionCollator

    model, processor = converted
    reference, _ = original_reference
    examples = []
    for row, sample in enumerate(reference["finetune"]):
        question = sample["text"].split("USER: <image>\n", 1)[1].split(" ASSISTANT: ", 1)[0]
        answer = sample["text"].rsplit(" ASSISTANT: ", 1)[1].removesuffix("</s>")
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        if layout == "messages":
            examples.append({"images": [fixture_images[row]], "messages": [user, assistant]})
        else:
            examples.append({"images": [fixture_images[row]], "prompt": [user], "completion": [assistant]})
    loss_flag = {"assistant_only_loss": True} if layout == "messages" else {"completion_only_loss": True}
    batch = AlignGPTInstructionCollator(processor, gate_text_scope="prompt", **loss_flag)(examples)
    for row, sample in enumerate(reference["finetune"]):
        expected_ids, expected_labels = ours(sample["input_ids"], model.config, sample["labels"])
        kept = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][kept].tolist() == expected_ids[0].tolist()
        assert batch["labels"][row][kept].tolist() == expected_labels[0].tolist()


@pytest.mark.parametrize("saved_again", [False, True])
def test_processor_ids_for_training_texts(converted, original_reference, fixture_images, saved_again, tmp_path):
    """Training texts (answers and `</s>` included; the plain pre-training format) tokenise like the original, also
    after the processor is saved again (as `aligngpt push` and `save_pretrained` do) and reloaded."""
    model, processor = converted
    if saved_again:
        processor.save_pretrained(tmp_path)
        processor = AutoProcessor.from_pretrained(tmp_path)
    reference, _ = original_reference
    for sample in reference["pretrain"] + reference["finetune"]:
        inputs = processor(images=fixture_images[0], text=sample["text"], return_tensors="pt")
        expected, _ = ours(sample["input_ids"], model.config)
        assert inputs["input_ids"].tolist() == expected.tolist(), sample["text"]
    text_only = processor(text=reference["text_only_prompt"])["input_ids"]
    assert text_only == [reference["text_only_input_ids"]]


def test_independent_reimplementation_matches_fixture(original_fixture_dir, original_reference):
    """The re-implementation used for the variants below reproduces the original's numbers itself."""
    reference, tensors = original_reference
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    original = OriginalAlignGPT(config, read_original_weights(original_fixture_dir / "checkpoint"),
                                original_fixture_dir / "clip-vit-tiny")
    for row in range(2):
        logits, _, _ = original(reference["input_ids"][row], tensors["pixel_values"][row])
        assert max_diff(logits, tensors[f"inference_logits_{row}"]) <= LOGITS_ATOL
    for row, sample in enumerate(reference["pretrain"]):
        _, loss, _ = original(sample["input_ids"], tensors["pixel_values"][row], sample["alignment_level"],
                              sample["labels"])
        assert abs(loss.item() - sample["loss"]) <= LOSS_ATOL
    for row, sample in enumerate(reference["finetune"]):
        _, loss, _ = original(sample["input_ids"], tensors["pixel_values"][row], labels=sample["labels"])
        assert abs(loss.item() - sample["loss"]) <= LOSS_ATOL
    generated = original.greedy(reference["input_ids"][1], tensors["pixel_values"][1], 12)
    assert generated == reference["inference_generated_ids"][1][len(reference["input_ids"][1]):]


# ---------------------------------------------------------------------------------------------------------------
# variants of the format that are not in the repository
# ---------------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_original_checkpoint(folder, config, state_dict, tokenizer_source, fmt):
    """An original-format checkpoint: config, tokenizer files and weights as `bin` / `bin-sharded` /
    `safetensors` / `safetensors-sharded` (shards + index file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_source) / name).is_file():
            shutil.copy(Path(tokenizer_source) / name, folder / name)
    suffix = "safetensors" if fmt.startswith("safetensors") else "bin"
    def save(sd, path):
        if suffix == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(sd, path)

    if not fmt.endswith("sharded"):
        save(state_dict, folder / ("model.safetensors" if suffix == "safetensors" else "pytorch_model.bin"))
        return folder
    keys = list(state_dict)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = f"{stem}-{i:05d}-of-00002.{suffix}"
        save({k: state_dict[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
             "weight_map": weight_map}
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    return folder


def rerandomised(tensor, generator):
    if not tensor.is_floating_point():
        return tensor.clone()
    scale = max(tensor.float().std().item() if tensor.numel() > 1 else 0.0, 0.02)
    return (tensor + scale * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)


@pytest.fixture(scope="module")
def variant(original_fixture_dir, tmp_path_factory):
    """A checkpoint of the same format with other settings and weights: seed 1, `linear` projector, feature layer
    -1, `cls_patch` (577 image features, so a 577-wide gate), 4 alignment levels, a 32-wide gate, rope_theta 5e4,
    and its own re-randomised vision tower. Written as sharded .bin without a tower copy (the tower comes from
    --vision-tower) and as .safetensors with the copy."""
    root = tmp_path_factory.mktemp("variant")
    generator = torch.Generator().manual_seed(1)
    source = read_original_weights(original_fixture_dir / "checkpoint")
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    config.update(mm_projector_type="linear", mm_vision_select_layer=-1, mm_vision_select_feature="cls_patch",
                  rope_theta=50000.0, mm_vision_tower="/home/authors/clip-vit-tiny-variant")
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    levels, gate_hidden, num_features = 4, 32, 577

    tower = CLIPVisionModel.from_pretrained(original_fixture_dir / "clip-vit-tiny")
    with torch.no_grad():
        for param in tower.parameters():
            param.copy_(rerandomised(param, generator))
    tower_dir = root / "clip-vit-tiny-variant"
    tower.save_pretrained(tower_dir)
    shutil.copy(original_fixture_dir / "clip-vit-tiny" / "preprocessor_config.json", tower_dir)

    state_dict = {}
    for key, value in source.items():
        if key.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head")) and "rotary" not in key:
            state_dict[key] = rerandomised(value, generator)
    head_dim = hidden // config["num_attention_heads"]
    inv_freq = 1.0 / (50000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(config["num_hidden_layers"]):
        state_dict[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state_dict["mm_projector.weight"] = 0.2 * torch.randn(hidden, mm_hidden, generator=generator)
    state_dict["mm_projector.bias"] = 0.1 * torch.randn(hidden, generator=generator)
    state_dict["align_indicators.indicator_embs"] = 3.0 * torch.randn(levels, hidden, generator=generator)
    state_dict["gated_weight_layer.mlp.0.weight"] = 1.0 * torch.randn(gate_hidden, num_features, generator=generator)
    state_dict["gated_weight_layer.mlp.0.bias"] = 0.1 * torch.randn(gate_hidden, generator=generator)
    state_dict["gated_weight_layer.mlp.2.weight"] = 2.0 * torch.randn(levels - 1, gate_hidden, generator=generator)
    state_dict["gated_weight_layer.mlp.2.bias"] = 0.1 * torch.randn(levels - 1, generator=generator)
    tower_copy = {f"vision_tower.vision_tower.vision_model.{k}": v.clone() for k, v in tower.state_dict().items()}

    tokenizer_source = original_fixture_dir / "checkpoint"
    bin_dir = write_original_checkpoint(root / "bin", config, state_dict, tokenizer_source, "bin-sharded")
    st_dir = write_original_checkpoint(root / "st", config, {**state_dict, **tower_copy}, tokenizer_source,
                                       "safetensors")
    return dict(config=config, state_dict=state_dict, tower_dir=tower_dir, bin_dir=bin_dir, st_dir=st_dir,
                original=OriginalAlignGPT(config, state_dict, tower_dir))


@pytest.fixture(scope="module")
def variant_expected(variant, original_reference):
    """The independent re-implementation's outputs for the variant, computed once for both formats."""
    original = variant["original"]
    reference, tensors = original_reference
    pixel_values = tensors["pixel_values"]
    return {
        "logits": [original(reference["input_ids"][row], pixel_values[row])[0] for row in range(2)],
        "text_only_logits": original(reference["text_only_input_ids"])[0],
        "finetune_losses": [original(s["input_ids"], pixel_values[row], labels=s["labels"])[1]
                            for row, s in enumerate(reference["finetune"])],
        # levels 2 and 3: the variant has 4
        "pretrain_losses": [original(s["input_ids"], pixel_values[row], row + 2, s["labels"])[1]
                            for row, s in enumerate(reference["pretrain"])],
    }


@pytest.fixture(scope="module")
def converted_variants(variant, tmp_path_factory):
    out = tmp_path_factory.mktemp("variant-converted")
    # sharded .bin without a tower copy: through the command line, tower from --vision-tower
    main(["--checkpoint", str(variant["bin_dir"]), "--vision-tower", str(variant["tower_dir"]),
          "--output", str(out / "bin"), "--dtype", "float32"])
    from_bin = AutoModelForImageTextToText.from_pretrained(out / "bin").eval()
    processor = AutoProcessor.from_pretrained(out / "bin")
    # .safetensors with the tower copy, in memory
    from_st, _ = convert_checkpoint(variant["st_dir"], variant["tower_dir"], dtype="float32")
    return {"bin": from_bin, "safetensors": from_st}, processor


def test_variant_config(converted_variants):
    models, processor = converted_variants
    for model in models.values():
        config = model.config
        assert config.projector_type == "linear" and model.model.multi_modal_projector.linear_2 is None
        assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
        assert config.num_image_tokens == 577 and processor.num_image_tokens == 577
        assert (config.num_alignment_levels, config.alignment_gate_hidden_size) == (4, 32)
        assert config.text_config.rope_parameters["rope_theta"] == 50000.0


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_variant_matches_independent_reimplementation(variant_expected, converted_variants, original_reference, fmt):
    models, _ = converted_variants
    model = models[fmt]
    reference, tensors = original_reference
    pixel_values = tensors["pixel_values"]
    for row in range(2):
        ids = reference["input_ids"][row]
        expected = variant_expected["logits"][row]
        with torch.no_grad():
            logits = model(input_ids=ours(ids, model.config)[0], pixel_values=pixel_values[row:row + 1]).logits[0]
        diff = max_diff(logits, expected)
        print(f"variant ({fmt}) prompt {row}: max abs logit difference {diff:.3g}")
        assert diff <= LOGITS_ATOL
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["text_only_input_ids"]])).logits[0]
    assert max_diff(logits, variant_expected["text_only_logits"]) <= LOGITS_ATOL
    scope_effects = []
    for row, sample in enumerate(reference["finetune"]):
        expected_loss = variant_expected["finetune_losses"][row]
        input_ids, labels = ours(sample["input_ids"], model.config, sample["labels"])
        batch = dict(input_ids=input_ids, labels=labels, pixel_values=pixel_values[row:row + 1])
        with torch.no_grad():
            loss = model(**batch).loss
            model.config.gate_text_scope = "prompt"
            try:
                prompt_scope_loss = model(**batch).loss
            finally:
                model.config.gate_text_scope = "conversation"
        print(f"variant ({fmt}) finetune {row}: loss {loss.item():.7f} independent {expected_loss.item():.7f} "
              f"(prompt-only gate input: {prompt_scope_loss.item():.7f})")
        assert abs(loss.item() - expected_loss.item()) <= LOSS_ATOL
        scope_effects.append(abs(prompt_scope_loss.item() - expected_loss.item()))
    # "conversation" is what reproduces the original's training loss; "prompt" gives the gate another input
    assert max(scope_effects) > 10 * LOSS_ATOL
    for row, sample in enumerate(reference["pretrain"]):
        level = row + 2  # 2, 3: the variant has 4 levels
        expected_loss = variant_expected["pretrain_losses"][row]
        input_ids, labels = ours(sample["input_ids"], model.config, sample["labels"])
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels, pixel_values=pixel_values[row:row + 1],
                         alignment_levels=torch.tensor([level])).loss
        assert abs(loss.item() - expected_loss.item()) <= LOSS_ATOL


def test_variant_generation_through_processor(variant, converted_variants, original_reference, fixture_images):
    models, processor = converted_variants
    reference, tensors = original_reference
    prompt = processor.apply_chat_template(reference_messages(reference["prompts"][1]), add_generation_prompt=True)
    inputs = processor(images=fixture_images[1], text=prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == ours(reference["input_ids"][1], models["bin"].config)[0].tolist()
    generated = models["bin"].generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = variant["original"].greedy(reference["input_ids"][1], tensors["pixel_values"][1], 8)
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# the phase-1 artefact
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def language_model_dir(original_fixture_dir, tmp_path_factory):
    """The fixture's LLM saved as a plain transformers Llama (the role Vicuna plays for the real checkpoints)."""
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("llm")
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    weights = read_original_weights(original_fixture_dir / "checkpoint")
    llm = OriginalAlignGPT(config, weights, original_fixture_dir / "clip-vit-tiny").llm
    llm.save_pretrained(folder)
    # saved by transformers 5, which does not keep `legacy`: the converter must restore the chunk behaviour itself
    LlamaTokenizer.from_pretrained(original_fixture_dir / "checkpoint").save_pretrained(folder)
    return folder


def test_pretrain_artefact_conversion(original_fixture_dir, original_reference, language_model_dir, fixture_images,
                                     tmp_path):
    reference, tensors = original_reference
    artefact = original_fixture_dir / "pretrain" / "mm_projector_align.bin"
    out = tmp_path / "stage2-start"
    parser = argparse.ArgumentParser()
    add_convert_subparser(parser.add_subparsers())
    args = parser.parse_args([
        "convert", "--pretrain-artefact", str(artefact), "--language-model", str(language_model_dir),
        "--vision-tower", str(original_fixture_dir / "clip-vit-tiny"), "--output", str(out), "--dtype", "float32",
        "--seed", "3",
    ])
    assert args.func is run_convert
    assert args.func(args) == 0
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)

    phase1 = torch.load(artefact, weights_only=True)
    state = model.state_dict()
    assert torch.equal(state["model.alignment_embeddings.weight"], phase1["align_indicators.indicator_embs"])
    assert torch.equal(state["model.multi_modal_projector.linear_1.weight"], phase1["mm_projector.0.weight"])
    assert torch.equal(state["model.multi_modal_projector.linear_2.bias"], phase1["mm_projector.2.bias"])
    # a fresh gate, initialised like the model's own, reproducible from the seed
    fresh = fresh_gate_state_dict(model.config, seed=3)
    for key, value in fresh.items():
        assert torch.equal(state[key], value), key
    assert model.config.gate_text_scope == "conversation" and model.config.num_image_tokens == 576

    # pre-training losses against the independent computation with the phase-1 projector and levels
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    weights = read_original_weights(original_fixture_dir / "checkpoint")
    weights.update(phase1)
    original = OriginalAlignGPT(config, weights, original_fixture_dir / "clip-vit-tiny")
    for row, sample in enumerate(reference["pretrain"]):
        _, expected, _ = original(sample["input_ids"], tensors["pixel_values"][row], sample["alignment_level"],
                                  sample["labels"])
        input_ids, labels = ours(sample["input_ids"], model.config, sample["labels"])
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels, pixel_values=tensors["pixel_values"][row:row + 1],
                         alignment_levels=torch.tensor([sample["alignment_level"]])).loss
        assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    # the tokenizer saved without `legacy` still gets the original's chunked ids
    prompt = processor.apply_chat_template(reference_messages(reference["prompts"][0]), add_generation_prompt=True)
    inputs = processor(text=prompt, images=fixture_images[0], return_tensors="pt")
    assert inputs["input_ids"].tolist() == ours(reference["input_ids"][0], model.config)[0].tolist()
    assert (inputs["pixel_values"] - tensors["pixel_values"][:1]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# errors, safety, helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_state_dict(original_fixture_dir):
    return read_original_weights(original_fixture_dir / "checkpoint")


def _checkpoint_with(tmp_path, original_fixture_dir, state_dict, fmt="safetensors"):
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    return write_original_checkpoint(tmp_path / "ckpt", config, state_dict, original_fixture_dir / "checkpoint", fmt)


def test_leftover_weight_is_an_error(tmp_path, original_fixture_dir, fixture_state_dict):
    state_dict = {**fixture_state_dict, "model.mm_extra_head.weight": torch.zeros(3)}
    folder = _checkpoint_with(tmp_path, original_fixture_dir, state_dict)
    with pytest.raises(ConversionError, match="model.mm_extra_head.weight"):
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny", dtype="float32")


def test_unfilled_weight_is_an_error(tmp_path, original_fixture_dir, fixture_state_dict):
    state_dict = {k: v for k, v in fixture_state_dict.items() if k != "model.layers.1.mlp.up_proj.weight"}
    folder = _checkpoint_with(tmp_path, original_fixture_dir, state_dict)
    with pytest.raises(ConversionError, match="model.language_model.layers.1.mlp.up_proj.weight"):
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny", dtype="float32")


def test_wrong_tower_for_the_gate_is_an_error(tmp_path, original_fixture_dir, fixture_state_dict):
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    config["mm_vision_select_feature"] = "cls_patch"  # 577 features, but the gate reads 576
    folder = write_original_checkpoint(tmp_path / "ckpt", config, fixture_state_dict,
                                       original_fixture_dir / "checkpoint", "safetensors")
    with pytest.raises(ConversionError, match="gate reads 576"):
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny", dtype="float32")


def test_rope_buffers_must_fit_the_config(tmp_path, original_fixture_dir, fixture_state_dict):
    """The dropped `rotary_emb.inv_freq` buffers are checked against the config (here a wrong rope_theta)."""
    config = json.loads((original_fixture_dir / "checkpoint" / "config.json").read_text())
    config["rope_theta"] = 50000.0
    folder = write_original_checkpoint(tmp_path / "ckpt", config, fixture_state_dict,
                                       original_fixture_dir / "checkpoint", "safetensors")
    with pytest.raises(ConversionError, match="rope_theta=50000"):
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny", dtype="float32")


class NotATensor:
    def __reduce__(self):
        return (print, ("arbitrary code ran while unpickling",))


def test_bin_weights_are_never_unpickled(tmp_path, original_fixture_dir, fixture_state_dict, capfd):
    folder = _checkpoint_with(tmp_path, original_fixture_dir, fixture_state_dict, fmt="bin")
    torch.save({**fixture_state_dict, "payload": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pytorch_model.bin is not a plain state dict of tensors") as info:
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny", dtype="float32")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)  # refused by the weights-only unpickler
    assert "arbitrary code ran" not in capfd.readouterr().out


def test_dtype_option(original_fixture_dir):
    model, processor = convert_checkpoint(original_fixture_dir / "checkpoint",
                                          original_fixture_dir / "clip-vit-tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype == torch.bfloat16


def test_vision_tower_defaults_to_the_config(original_fixture_dir):
    """Without --vision-tower the config's `mm_vision_tower` is used (relative paths: from the checkpoint)."""
    model, _ = convert_checkpoint(original_fixture_dir / "checkpoint", dtype="float32")
    assert model.config.vision_config.image_size == 48


def test_push_to_hub_uploads_the_aligngpt_card(original_fixture_dir, monkeypatch):
    """`convert --push-to-hub` goes through `aligngpt push`'s staging: one commit with model, processor, remote code
    and the AlignGPT card saying where the weights come from (not transformers' placeholder card)."""
    import huggingface_hub

    uploads = []

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = {p.name for p in Path(folder_path).iterdir()}
            uploads.append(("upload", repo_id, files, (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    convert_checkpoint(original_fixture_dir / "checkpoint", dtype="float32", push_to_hub="you/aligngpt-conv")
    (_, repo), (_, repo_again, files, card) = uploads
    assert repo == repo_again == "you/aligngpt-conv"
    assert {"model.safetensors", "processor_config.json", "modeling_aligngpt.py", "README.md"} <= files
    assert "Converted from the original AlignGPT release format" in card and "More Information Needed" not in card


def test_convert_original_sequence():
    ids, labels = convert_original_sequence([1, 5, -200, 6, 7], [-100, -100, -100, 6, 7], image_token_id=400,
                                            alignment_token_id=401, num_image_tokens=3)
    assert ids == [1, 401, 5, 400, 400, 400, 6, 7]
    assert labels == [-100, -100, -100, -100, -100, -100, 6, 7]
    assert convert_original_sequence([1, 5, 6], image_token_id=400, alignment_token_id=401,
                                     num_image_tokens=3) == [1, 5, 6]


def test_command_line_needs_one_source(capsys):
    with pytest.raises(SystemExit):
        main(["--output", "x"])
    with pytest.raises(SystemExit):
        main(["--pretrain-artefact", "a.bin", "--output", "x"])


# ---------------------------------------------------------------------------------------------------------------
# refusing inputs that would convert into a broken model, or destroy files
# ---------------------------------------------------------------------------------------------------------------


def _copy_checkpoint(folder, original_fixture_dir, skip=(), **config_updates):
    """A writable copy of the fixture checkpoint (file by file: the fixture is read-only), config.json updated."""
    folder.mkdir(parents=True)
    for path in (original_fixture_dir / "checkpoint").iterdir():
        if path.name not in skip:
            shutil.copyfile(path, folder / path.name)
    if config_updates:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_updates}))
    return folder


def test_missing_or_misfit_tokenizer_is_an_error(tmp_path, original_fixture_dir, tokenizer):
    tower = original_fixture_dir / "clip-vit-tiny"
    folder = _copy_checkpoint(tmp_path / "no-tokenizer", original_fixture_dir, skip=("tokenizer.model",))
    with pytest.raises(ConversionError, match="No tokenizer in .*no-tokenizer .tokenizer.model or tokenizer.json"):
        convert_checkpoint(folder, tower)
    # another tokenizer (400 tokens, <image>/<align> among them): the placeholders would take ids of real rows
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConversionError, match=r"has 398 tokens but the checkpoint.s vocabulary .* has 400"):
        convert_checkpoint(folder, tower)


def test_output_folder_is_checked_before_converting(tmp_path, original_fixture_dir, converted_original_dir, capsys):
    tower = str(original_fixture_dir / "clip-vit-tiny")
    folder = _copy_checkpoint(tmp_path / "ckpt", original_fixture_dir)
    before = (folder / "config.json").read_text()
    with pytest.raises(ConversionError, match="is the source folder"):
        convert_checkpoint(folder, tower, output_dir=tmp_path / "." / "ckpt", overwrite=True)
    assert (folder / "config.json").read_text() == before
    # ... also the tower that config.json names (mm_vision_tower, relative to the checkpoint), not passed
    shutil.copytree(original_fixture_dir / "clip-vit-tiny", tmp_path / "clip-vit-tiny")
    tower_files = sorted(p.name for p in (tmp_path / "clip-vit-tiny").iterdir())
    with pytest.raises(ConversionError, match="is the source folder"):
        convert_checkpoint(folder, None, output_dir=tmp_path / "clip-vit-tiny", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "clip-vit-tiny").iterdir()) == tower_files
    # a converted folder given as the source: said so, not "84 weights have no place"
    with pytest.raises(ConversionError, match="is already converted"):
        convert_checkpoint(converted_original_dir, tower)
    (tmp_path / "mixed").mkdir()  # original config, weights of this package's layout
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(folder / name, tmp_path / "mixed" / name)
    shutil.copyfile(converted_original_dir / "model.safetensors", tmp_path / "mixed" / "model.safetensors")
    with pytest.raises(ConversionError, match="already in this package's layout"):
        convert_checkpoint(tmp_path / "mixed", tower)
    # a non-empty output is refused (by the command line too: exit status 2, one line) ...
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    (out / "pytorch_model.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(folder), "--vision-tower", tower, "--output", str(out)])
    assert exit_info.value.code == 2
    assert "--output " + str(out) + " is not empty" in capsys.readouterr().err
    # ... unless --overwrite: the stale weight files go, other files stay, and the result loads
    main(["--checkpoint", str(folder), "--vision-tower", tower, "--output", str(out), "--overwrite"])
    files = {p.name for p in out.iterdir()}
    assert "notes.txt" in files and "pytorch_model.bin" not in files and "model.safetensors.index.json" not in files
    assert AutoModelForImageTextToText.from_pretrained(out).config.text_config.vocab_size == 402


@pytest.mark.parametrize("name, content, message", [
    ("pytorch_model.bin", b"garbage\n", "pytorch_model.bin is not a plain state dict of tensors"),
    ("pytorch_model.bin", None, "pytorch_model.bin cannot be read as a PyTorch weight file"),
    ("model.safetensors", b"garbage\n", "model.safetensors is not a readable safetensors file"),
])
def test_damaged_weight_files_are_named(tmp_path, original_fixture_dir, name, content, message):
    folder = _copy_checkpoint(tmp_path / "ckpt", original_fixture_dir, skip=("pytorch_model.bin",))
    original = (original_fixture_dir / "checkpoint" / "pytorch_model.bin").read_bytes()
    (folder / name).write_bytes(content if content is not None else original[:5000])  # None: truncated
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder, original_fixture_dir / "clip-vit-tiny")


def test_vision_tower_problems_say_what_to_pass(tmp_path, original_fixture_dir):
    with pytest.raises(ConversionError, match="images has no config.json: expected a CLIP/SigLIP checkpoint folder"):
        convert_checkpoint(original_fixture_dir / "checkpoint", original_fixture_dir / "images")
    # the authors' absolute path, and a relative one that does not resolve from a copy elsewhere
    for name, tower in (("abs", "/home/authors/checkpoints/clip-vit-large-patch14-336"), ("rel", "../clip-vit-tiny")):
        folder = _copy_checkpoint(tmp_path / name / "ckpt", original_fixture_dir, mm_vision_tower=tower)
        with pytest.raises(ConversionError, match=f"names the vision tower '{tower}'.*pass --vision-tower"):
            convert_checkpoint(folder)


def test_pretrain_language_model_must_be_a_causal_lm(original_fixture_dir, tmp_path):
    with pytest.raises(ConversionError, match="is not a causal language model .model_type 'clip_vision_model'"):
        convert_pretrain_artefact(original_fixture_dir / "pretrain" / "mm_projector_align.bin",
                                  original_fixture_dir / "clip-vit-tiny", original_fixture_dir / "clip-vit-tiny",
                                  tmp_path / "out")


def test_a_phase1_output_folder_is_pointed_to_pretrain_artefact(original_fixture_dir, tmp_path):
    """The original's phase-1 output (config.json + mm_projector_align.bin) given as --checkpoint is named for what
    it is (not "no tokenizer", then "no weights"), and --pretrain-artefact takes the folder, as training does."""
    folder = tmp_path / "aligngpt-pretrain"
    shutil.copytree(original_fixture_dir / "pretrain", folder)
    shutil.copyfile(original_fixture_dir / "checkpoint" / "config.json", folder / "config.json")
    expected = r"is a phase-1 \(pre-training\) output .* --pretrain-artefact .*aligngpt-pretrain/mm_projector_align"
    with pytest.raises(ConversionError, match=expected):
        convert_checkpoint(folder, str(original_fixture_dir / "clip-vit-tiny"), tmp_path / "out")
    # the folder as --pretrain-artefact: read (the next check, on the language model, is reached)
    with pytest.raises(ConversionError, match="is not a causal language model"):
        convert_pretrain_artefact(folder, original_fixture_dir / "clip-vit-tiny",
                                  original_fixture_dir / "clip-vit-tiny", tmp_path / "out")
    with pytest.raises(ConversionError, match=r"no mm_projector_align.bin or mm_projector_align.safetensors in it"):
        convert_pretrain_artefact(tmp_path, original_fixture_dir / "clip-vit-tiny",
                                  original_fixture_dir / "clip-vit-tiny", tmp_path / "out2")


def test_card_info_records_the_bases_and_the_license(tmp_path, original_fixture_dir):
    """What the converter knows goes into aligngpt_card_info.json: the LLM of `_name_or_path` and the tower (Hub
    ids only), the source as given, the license: llama2 for a Vicuna v1.5 base, else what --license says."""
    tower = str(original_fixture_dir / "clip-vit-tiny")
    folder = _copy_checkpoint(tmp_path / "aligngpt-7b", original_fixture_dir, _name_or_path="lmsys/vicuna-7b-v1.5",
                              mm_vision_tower="openai/clip-vit-large-patch14-336")
    convert_checkpoint(folder, tower, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "aligngpt_card_info.json").read_text())
    assert info["license"] == "llama2"
    assert info["base_models"] == ["lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"]
    assert info["source"] == {"converted_from": str(folder), "language_model": "lmsys/vicuna-7b-v1.5",
                              "vision_tower": "openai/clip-vit-large-patch14-336"}
    assert f"(`{folder}`)" in info["summary"]
    other = _copy_checkpoint(tmp_path / "other", original_fixture_dir, _name_or_path="someone/other-llm")
    main(["--checkpoint", str(other), "--vision-tower", tower, "--output", str(tmp_path / "out2"), "--license", "mit"])
    info = json.loads((tmp_path / "out2" / "aligngpt_card_info.json").read_text())
    assert info["license"] == "mit" and info["base_models"] == ["someone/other-llm"]
