"""AlignGPT vs transformers' LLaVA: the cost of the alignment token and the gate.

Both models are built in the same run from configs with random weights, and share every weight they have in
common (vision tower, projector, LLM, LM head): LLaVA is built first, AlignGPT is built on the meta device and
takes LLaVA's tensors (`load_state_dict(..., assign=True)`); only AlignGPT's alignment embeddings (N x hidden) and
gate are its own. Inputs are built as tensors (no tokenizer), with the layouts of the two models:

    LLaVA     [bos,          text..., <image> x 576, text...]
    AlignGPT  [bos, <align>, text..., <image> x 576, text...]     (one token longer when the row has an image)

Cases (each prints JSON lines with `case`, `model`, `batch`, seconds or tokens/s and the AlignGPT/LLaVA `ratio`):
- `forward`: one no-grad forward of one image row (the prefill a 7B forward means), AlignGPT vs LLaVA and vs LLaVA
  given a same-length sequence (a text token in the <align> slot), plus the alignment path alone (placeholder
  masks, checks, gate, alignment vector, `where`), timed on the same tensors: its share of the forward;
- `train`: forward + backward (loss on answers) at batch 1 (an image row) and 16 (12 image rows, 4 text-only rows,
  right-padded); vision tower frozen, projector + gate + LLM trained, as in instruction tuning;
- `generate`: greedy `generate()` at batch 1 and 32 (left-padded, prompts of 624..640 LLaVA tokens): time to first
  token (`max_new_tokens=1`), end-to-end tokens/s and decode-only tokens/s of N new tokens; with the default
  dynamic cache, and with the static cache (+ `torch.compile` of the decoding step, which transformers does on CUDA
  by itself; on CPU only with `--cpu-compile`). Greedy token ids of the static/compiled path are compared with the
  default path's.
- `profile` (`--profile`): torch.profiler tables of the alignment path and of an AlignGPT forward.

CPU (small model, hidden 512, 4 layers):  python benchmarks/bench_model.py [--quick] --out outputs/bench_cpu.jsonl
    (`--threads 1` gives steadier ratios on a machine shared with other jobs; `--quick` uses 64 image tokens,
    batches 1 and 4 and 8 new tokens: a smoke run of every case, under two minutes on two cores)
GPU (Vicuna-7B + CLIP ViT-L/14-336 shapes, bf16, SDPA), about 3 minutes on an H200:
    python benchmarks/bench_model.py --device cuda --shapes 7b --budget-s 210 --explain --out outputs/bench_7b.jsonl
Tables from a JSON-lines file:  python benchmarks/bench_model.py --summarize outputs/bench_7b.jsonl
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch import nn
from transformers import CLIPVisionConfig, CompileConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OpLog, Recorder, compare, log, machine_info, ratios, synchronize, time_call

try:
    from transformers_aligngpt import AlignGPTConfig, AlignGPTForConditionalGeneration
except ImportError:  # a checkout where the package is not installed (e.g. the GPU machine): use src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers_aligngpt import AlignGPTConfig, AlignGPTForConditionalGeneration

BOS, EOS, PAD = 1, 2, 0
IMAGE_ID, ALIGN_ID = 32000, 32001
VOCAB = 32064  # as llava-1.5-hf: 32000 Llama tokens + <image>, <align>, padding to a multiple of 64
FILLER_ID = 29871  # an ordinary text token, put in the <align> slot for the "same length" LLaVA reference
SYSTEM_LEN = 34  # tokens before the image: system prompt + "USER:" (Vicuna v1 template)

SHAPES = {
    # the CPU model of the issue: a 4-layer, 512-wide Llama; a 4-layer CLIP tower with the real patch grid
    # (336 / 14 -> 576 image tokens), so the sequence layout and the gate width are the real ones
    "small": {
        "text": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8),
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       image_size=336, patch_size=14, projection_dim=256),
    },
    # host-overhead shapes (bench_alignment_path.py, bench_decode_step.py): arithmetic negligible, the real patch grid
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=336, patch_size=14, projection_dim=32),
    },
    # Vicuna-7B-v1.5 + CLIP ViT-L/14-336 (the released aligngpt-7b / llava-1.5-7b)
    "7b": {
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    },
}


# ----------------------------------------------------------------------------------------------------------------
# models


def build_configs(args):
    shapes = SHAPES[args.shapes]
    text_kwargs = dict(shapes["text"])
    vision_kwargs = dict(shapes["vision"])
    if args.layers is not None:
        text_kwargs["num_hidden_layers"] = args.layers
    if args.vision_layers is not None:
        vision_kwargs["num_hidden_layers"] = args.vision_layers
    if args.image_size is not None:
        vision_kwargs["image_size"] = args.image_size
    text = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, tie_word_embeddings=False, **text_kwargs,
    )
    vision = CLIPVisionConfig(layer_norm_eps=1e-5, hidden_act="quick_gelu", **vision_kwargs)
    common = dict(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    llava = LlavaConfig(image_seq_length=(vision.image_size // vision.patch_size) ** 2, **common)
    # as converted checkpoints (the released weights) are: placeholder columns of the logits suppressed
    aligngpt = AlignGPTConfig(alignment_token_id=ALIGN_ID, projector_type="mlp2x_gelu", suppress_placeholder_logits=True,
                              **common)
    return llava, aligngpt


def build_models(args, dtype):
    """LLaVA with random weights on the device, and AlignGPT sharing its tensors (built on the meta device)."""
    llava_config, aligngpt_config = build_configs(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        llava = LlavaForConditionalGeneration._from_config(llava_config, dtype=dtype, attn_implementation=args.attn)
    with torch.device("meta"):
        aligngpt = AlignGPTForConditionalGeneration._from_config(
            aligngpt_config, dtype=dtype, attn_implementation=args.attn
        )
    missing, unexpected = aligngpt.load_state_dict(llava.state_dict(), strict=False, assign=True)
    own = {k for k in aligngpt.state_dict() if ".alignment_" in k}
    if unexpected or set(missing) != own:
        raise RuntimeError(f"state dicts do not line up: missing {missing}, unexpected {unexpected}")
    # non-persistent buffers (rotary inv_freq, CLIP position ids) are not in the state dict: take LLaVA's
    llava_buffers = dict(llava.named_buffers())
    for name, buffer in list(aligngpt.named_buffers()):
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            aligngpt.get_submodule(owner_name)._buffers[leaf] = llava_buffers[name]
    inner = aligngpt.model
    for module in (inner.alignment_embeddings, inner.alignment_gate):
        module.to_empty(device=device)
    with torch.no_grad():
        nn.init.xavier_uniform_(inner.alignment_embeddings.weight)  # as AlignGPT's own init
        for linear in (inner.alignment_gate.fc1, inner.alignment_gate.fc2):
            linear.weight.normal_(0.0, aligngpt_config.text_config.initializer_range)
            linear.bias.zero_()
    for key, value in {**dict(aligngpt.named_parameters()), **dict(aligngpt.named_buffers())}.items():
        if value.is_meta:
            raise RuntimeError(f"{key} is still on the meta device")
    assert aligngpt.lm_head.weight.data_ptr() == llava.lm_head.weight.data_ptr(), "weights are not shared"
    for model in (llava, aligngpt):
        model.eval()
        model.generation_config.pad_token_id = PAD
        model.generation_config.bos_token_id = BOS
        model.generation_config.eos_token_id = EOS
    return llava, aligngpt


def build_tiny_models(dtype, device: str = "cpu"):
    """(build args, LLaVA, AlignGPT) at the host-overhead shapes (`SHAPES["tiny"]`), SDPA, on the CPU unless `device`
    says otherwise: the models of bench_alignment_path.py, bench_decode_step.py and bench_host_bookkeeping.py."""
    args = argparse.Namespace(shapes="tiny", layers=None, vision_layers=None, image_size=None, device=device,
                              attn="sdpa", question_max=29)
    return (args, *build_models(args, dtype))


# ----------------------------------------------------------------------------------------------------------------
# inputs


class Rows:
    """Token rows drawn once; rendered for LLaVA, for AlignGPT, or for LLaVA at AlignGPT's length."""

    def __init__(self, seed: int, num_image_tokens: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.num_image_tokens = num_image_tokens

    def text(self, n: int) -> list[int]:
        return torch.randint(3, IMAGE_ID, (n,), generator=self.generator).tolist()

    def image_row(self, question_len: int, answer_len: int = 0) -> dict:
        return {"image": True, "pre": self.text(SYSTEM_LEN), "post": self.text(question_len),
                "answer": self.text(answer_len)}

    def text_row(self, length: int) -> dict:
        answer = length // 3
        return {"image": False, "pre": self.text(length - answer), "post": [], "answer": self.text(answer)}

    def render(self, row: dict, model: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one row; `model` is `llava`, `aligngpt` or `llava_same_len`."""
        head = [BOS]
        if row["image"] and model == "aligngpt":
            head.append(ALIGN_ID)
        elif row["image"] and model == "llava_same_len":
            head.append(FILLER_ID)
        image = [IMAGE_ID] * self.num_image_tokens if row["image"] else []
        prompt = head + row["pre"] + image + row["post"]
        ids = prompt + row["answer"]
        labels = [-100] * len(prompt) + row["answer"]
        return ids, labels


def collate(rows_obj: Rows, rows: list[dict], model: str, padding_side: str, pixel_values, device, labels=False):
    rendered = [rows_obj.render(row, model) for row in rows]
    length = max(len(ids) for ids, _ in rendered)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    label_ids = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rendered):
        sl = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        attention_mask[i, sl] = 1
        label_ids[i, sl] = torch.tensor(lab)
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    if labels:
        batch["labels"] = label_ids.to(device)
    return batch


def make_pixels(n: int, image_size: int, dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=generator).to(device, dtype)


def batch_for(args, models_rows, image_size, dtype, padding_side, labels, seed, model_names):
    rows_obj, rows = models_rows
    n_images = sum(row["image"] for row in rows)
    pixels = make_pixels(n_images, image_size, dtype, args.device, seed) if n_images else None
    return {
        name: collate(rows_obj, rows, name, padding_side, pixels, args.device, labels=labels) for name in model_names
    }


def train_rows(batch: int, num_image_tokens: int, seed: int):
    """Batch 1: one image row. Larger: every 4th row text-only, lengths drawn like an instruction-tuning mix."""
    rows_obj = Rows(seed, num_image_tokens)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for i in range(batch):
        if batch > 1 and i % 4 == 3:
            # text-only (ShareGPT-like) rows: 20%..100% of a long image row
            longest = 1 + SYSTEM_LEN + num_image_tokens + 150
            rows.append(rows_obj.text_row(int(torch.randint(longest // 5, longest + 1, (1,), generator=g))))
        else:
            q = 20 if batch == 1 else int(torch.randint(8, 31, (1,), generator=g))
            a = 60 if batch == 1 else int(torch.randint(16, 121, (1,), generator=g))
            rows.append(rows_obj.image_row(q, a))
    return rows_obj, rows


def generation_rows(batch: int, num_image_tokens: int, seed: int, question_max: int):
    """Image rows; batch 1 is the longest prompt, larger batches vary the question length (left padding)."""
    rows_obj = Rows(seed, num_image_tokens)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for i in range(batch):
        q = question_max if i == 0 else int(torch.randint(max(1, question_max - 16), question_max + 1, (1,), generator=g))
        rows.append(rows_obj.image_row(q))
    return rows_obj, rows


# ----------------------------------------------------------------------------------------------------------------
# cases


def alignment_path(inner, input_ids, attention_mask, image_features):
    """AlignGPTModel.forward's work around the vision tower, with the model's own methods: placeholder masks and
    checks (`locate_placeholders`), `compute_alignment_vectors` (text mean, affinities, gate, mix) and
    `merge_placeholders` (the image features and each row's alignment vector into the embeddings)."""
    inputs_embeds = inner.get_input_embeddings()(input_ids)
    num_images, num_patches = image_features.shape[:2]
    layout = inner.locate_placeholders(
        input_ids, inputs_embeds, attention_mask, None, None, num_images, num_patches, True
    )
    # (gate_text_runs only where the layout has them: bench_host_bookkeeping.py runs this with older revisions too)
    runs = {"gate_text_runs": layout.gate_text_runs} if getattr(layout, "gate_text_runs", None) is not None else {}
    vectors, _ = inner.compute_alignment_vectors(
        image_features, inputs_embeds, layout.image_mask, layout.align_mask, attention_mask, None, None,
        layout.gate_text, layout.gate_text_counts, **runs,
    )
    return inner.merge_placeholders(inputs_embeds, image_features, vectors, layout)


def device_bookkeeping(inner, input_ids, inputs_embeds, attention_mask, num_images, num_patches):
    """The placeholder masks, checks and gate tokens as the device path computes them (traced forwards and
    `inputs_embeds` use it; the eager forward does the same work on the host: `placeholders_on_host`)."""
    image_mask, align_mask = inner.get_placeholder_masks(input_ids, inputs_embeds)
    gate_text = inner.gate_text_tokens(image_mask, align_mask, attention_mask, None)
    counts = inner.check_placeholders(image_mask, align_mask, num_images, num_patches, None, gate_text)
    return image_mask, align_mask, gate_text.to(inputs_embeds.dtype), counts


def llava_merge(inner, input_ids, image_features):
    """LlavaModel.forward's counterpart: embedding, image mask and its check, `masked_scatter`."""
    inputs_embeds = inner.get_input_embeddings()(input_ids)
    flat = image_features.reshape(-1, image_features.shape[-1])
    mask = inner.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=flat)
    return inputs_embeds.masked_scatter(mask, flat)


def case_forward(args, rec, llava, aligngpt, dtype, image_size, num_image_tokens):
    rows = generation_rows(1, num_image_tokens, seed=11, question_max=args.question_max)
    names = ["aligngpt", "llava", "llava_same_len"]
    batches = batch_for(args, rows, image_size, dtype, "left", False, 12, names)
    models = {"aligngpt": aligngpt, "llava": llava, "llava_same_len": llava}
    # the gate's cost inside the real forward: the same AlignGPT inputs with alignment_mode="global" (the <align>
    # slot gets E[N-1]; no text mean, affinities, gate or mix)
    names.append("aligngpt_global")
    batches["aligngpt_global"], models["aligngpt_global"] = batches["aligngpt"], aligngpt

    def fwd(name):
        def call():
            mode = aligngpt.config.alignment_mode
            if name == "aligngpt_global":
                aligngpt.config.alignment_mode = "global"
            try:
                with torch.no_grad():
                    return models[name](**batches[name], use_cache=False, logits_to_keep=1)
            finally:
                aligngpt.config.alignment_mode = mode
        return call

    res = compare({name: fwd(name) for name in names}, args.device, warmup=args.warmup, repeats=args.repeats)
    gate = ratios(res, "aligngpt", "aligngpt_global")
    rec.emit(case="gate_in_forward", model="aligngpt", batch=1, seconds=res["aligngpt"]["median"],
             global_seconds=res["aligngpt_global"]["median"], ratio=gate["ratio"], ratio_paired=gate["ratio_paired"],
             share_of_forward=gate["ratio_paired"] - 1,
             note="AlignGPT adaptive over the same forward with alignment_mode=global, paired repeats, minus 1")
    names.remove("aligngpt_global")
    for name in names:
        rec.emit(case="forward", model=name, batch=1, seq_len=batches[name]["input_ids"].shape[1],
                 seconds=res[name]["median"], min_seconds=res[name]["min"], cpu_seconds=res[name].get("cpu_median"),
                 times=res[name]["times"],
                 **({} if name == "aligngpt" else {f"aligngpt_{k}": v for k, v in ratios(res, "aligngpt", name).items()}))

    # the alignment path alone against LLaVA's merge of the image features, each on its own model's tensors
    with torch.no_grad():
        image_features = torch.stack(list(aligngpt.model.get_image_features(
            pixel_values=batches["aligngpt"]["pixel_values"], return_dict=True).pooler_output)).to(dtype)
        a_ids, a_mask = batches["aligngpt"]["input_ids"], batches["aligngpt"]["attention_mask"]
        l_ids = batches["llava"]["input_ids"]
        path = compare(
            {"aligngpt": lambda: alignment_path(aligngpt.model, a_ids, a_mask, image_features),
             "llava": lambda: llava_merge(llava.model, l_ids, image_features)},
            args.device, warmup=max(args.warmup, 3), repeats=max(args.repeats, 21),
        )
    forward = res["llava"]["median"]
    extra = path["aligngpt"]["median"] - path["llava"]["median"]
    # the extra token from back-to-back pairs (a difference of medians would carry the noise of both)
    token_share = ratios(res, "llava_same_len", "llava")["ratio_paired"] - 1
    rec.emit(case="alignment_path", model="aligngpt", batch=1, seconds=path["aligngpt"]["median"],
             llava_merge_seconds=path["llava"]["median"], extra_seconds=extra, share_of_forward=extra / forward,
             note="AlignGPT's embed + masks + checks + gate + alignment vector + merge, minus LLaVA's embed + mask + "
                  "check + merge")
    rec.emit(case="extra_token", model="llava", batch=1, seconds=token_share * forward, share_of_forward=token_share,
             expected_share=1 / batches["llava"]["input_ids"].shape[1],
             note="LLaVA one token longer (a text token in the <align> slot) over LLaVA, paired repeats, minus 1")
    rec.emit(case="alignment_cost", model="aligngpt", batch=1, seconds=extra + token_share * forward,
             share_of_forward=extra / forward + token_share, goal="< 0.01 of a forward")


def case_train(args, rec, llava, aligngpt, dtype, image_size, num_image_tokens):
    models = {"aligngpt": aligngpt, "llava": llava}
    for model in models.values():
        model.train()
        model.model.vision_tower.requires_grad_(False)
        if args.checkpointing:
            model.activation_checkpointing_enable()
    try:
        for batch_size in args.train_batches:
            if over_budget(args, rec, "train", batch_size):
                continue
            rows = train_rows(batch_size, num_image_tokens, seed=100 + batch_size)
            batches = batch_for(args, rows, image_size, dtype, "right", True, 200 + batch_size, list(models))

            def step(name, batches=batches):
                def call():
                    out = models[name](**batches[name])
                    out.loss.backward()
                    models[name].zero_grad(set_to_none=True)
                return call

            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            res = compare({name: step(name) for name in models}, args.device, warmup=args.warmup,
                          repeats=args.train_repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
            n_text = sum(not row["image"] for row in rows[1])
            for name in models:
                rec.emit(case="train_step", model=name, batch=batch_size, text_only_rows=n_text,
                         seq_len=batches[name]["input_ids"].shape[1], seconds=res[name]["median"],
                         min_seconds=res[name]["min"], cpu_seconds=res[name].get("cpu_median"),
                         checkpointing=args.checkpointing, peak_gib=peak,
                         **(ratios(res, "aligngpt", "llava") if name == "aligngpt" else {}))
    finally:
        for model in models.values():
            model.zero_grad(set_to_none=True)
            if args.checkpointing:
                model.activation_checkpointing_disable() if hasattr(model, "activation_checkpointing_disable") \
                    else model.gradient_checkpointing_disable()
                # transformers' disable leaves the input-embedding hooks that enable put on (`requires_grad_` on every
                # embedding output; it removes them only under PEFT): in the compiled decoding step measured later
                # each is a graph break (4 for AlignGPT, 7 for LLaVA in the H100 runs), which a fresh model has not
                model.disable_input_require_grads()
            model.model.vision_tower.requires_grad_(True)
            model.eval()


def generate_kwargs(args, path: str, new_tokens: int, max_cache_len: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if path == "default":
        return kwargs
    kwargs.update(cache_implementation="static", max_cache_len=max_cache_len)
    if path == "static":
        kwargs["disable_compile"] = True
    else:  # static_compiled
        config = CompileConfig(fullgraph=args.fullgraph, mode=args.compile_mode)
        if not args.device.startswith("cuda"):
            config._compile_all_devices = True  # transformers' switch to compile on CPU too
        kwargs["compile_config"] = config
    return kwargs


def greedy_agreement(tokens, ref_tokens, ref_gaps) -> dict:
    """Greedy ids of a path against the default path's: equal rows, and where they part, how close the default
    path's top-1 and top-2 logits were at that step (a near-tie there is numerics, not a different model)."""
    same = tokens == ref_tokens
    result = {"greedy_equal": bool(same.all()), "greedy_rows_equal": int(same.all(-1).sum()),
              "greedy_rows": int(same.shape[0]), "ref_logit_gap_median": float(ref_gaps.median())}
    diverged = ~same.all(-1)
    if diverged.any():
        first = (~same).float().argmax(-1)  # first differing step of each row
        rows = diverged.nonzero().flatten()
        result["greedy_first_divergence_step"] = int(first[rows].min())
        result["ref_logit_gap_at_divergence_max"] = float(ref_gaps[rows, first[rows]].max())
    return result


def generation_inputs(args, dtype, image_size, num_image_tokens, batch_size, same_len=False) -> tuple[dict, int]:
    """({model: left-padded generation batch}, static cache length) for a batch size: the same cache length for both
    models, a multiple of 64 (identical shapes, no recompilation between them). `same_len`: also LLaVA's batch at
    AlignGPT's length (`llava_same_len`, a text token in each `<align>` slot)."""
    rows = generation_rows(batch_size, num_image_tokens, seed=300 + batch_size, question_max=args.question_max)
    names = ["aligngpt", "llava"] + (["llava_same_len"] if same_len else [])
    batches = batch_for(args, rows, image_size, dtype, "left", False, 400 + batch_size, names)
    longest = max(b["input_ids"].shape[1] for b in batches.values())
    return batches, -(-(longest + args.new_tokens) // 64) * 64


def explain_decode(args, rec, llava, aligngpt, dtype, image_size, num_image_tokens, batch_size):
    """`torch._dynamo.explain` of one decoding step of each model, with the inputs `generate` gives it (static
    cache): graph count, graph breaks and their reasons. Runs before any compiled case (explain resets dynamo)."""
    models = {"aligngpt": aligngpt, "llava": llava}
    batches, max_cache_len = generation_inputs(args, dtype, image_size, num_image_tokens, batch_size)
    for name, model in models.items():
        captured = []
        hook = model.register_forward_pre_hook(
            lambda _m, _a, kw, captured=captured: captured.append(dict(kw)), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model.generate(**batches[name], **generate_kwargs(args, "static", 2, max_cache_len))
        finally:
            hook.remove()
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(**captured[-1])
        rec.emit(case="explain_decode", model=name, batch=batch_size, graph_count=explanation.graph_count,
                 graph_break_count=explanation.graph_break_count, op_count=explanation.op_count,
                 break_reasons=[str(b.reason)[:300] for b in explanation.break_reasons][:12])
    torch._dynamo.reset()


def graph_break_reasons() -> dict:
    try:
        from torch._dynamo.utils import counters

        return dict(counters["graph_break"])
    except Exception:  # noqa: BLE001
        return {}


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())
    except Exception:  # noqa: BLE001
        return -1


def case_generate(args, rec, llava, aligngpt, dtype, image_size, num_image_tokens, batch_size, path, references):
    models = {"aligngpt": aligngpt, "llava": llava}
    # the default path's prefill is also timed for LLaVA at AlignGPT's length: what the extra token costs at this
    # batch size, apart from the gate and the merge
    same_len = path == "default"
    batches, max_cache_len = generation_inputs(args, dtype, image_size, num_image_tokens, batch_size, same_len)
    n = args.new_tokens

    def gen(name, tokens):
        kwargs = generate_kwargs(args, path, tokens, max_cache_len)
        model = models["llava" if name == "llava_same_len" else name]
        return lambda: model.generate(**batches[name], **kwargs)

    # first calls: compile / warm-up, and the token ids compared between paths (the default path keeps each
    # step's top-1 / top-2 logit gap, to tell a numerical near-tie from a real change where paths disagree)
    breaks_before = graph_breaks()
    outputs, gaps, first_call = {}, {}, {}
    breaks_by_model = {}
    # the model compiled second reuses what the first compiled (the shared generate / wrapper code: 24 s vs 5.5 s on
    # an H200); --compile-first picks which one that is
    first = args.compile_first
    for name in [first] + [m for m in models if m != first]:
        if path == "static_compiled":
            before = graph_break_reasons()
            first_call[name] = time_call(gen(name, min(4, n)), args.device)  # compiles, records CUDA graphs
            after = graph_break_reasons()
            breaks_by_model[name] = {k[:300]: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
        kwargs = generate_kwargs(args, path, n, max_cache_len)
        if path == "default":
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = models[name].generate(**batches[name], **kwargs)
        synchronize(args.device)
        first_call.setdefault(name, time.perf_counter() - t0)
        if path == "default":
            top2 = torch.stack(out.logits, 1).float().topk(2, dim=-1).values  # (batch, new tokens, 2)
            gaps[name] = (top2[..., 0] - top2[..., 1]).cpu()
            out = out.sequences
            del top2
        prompt_len = batches[name]["input_ids"].shape[1]
        outputs[name] = out[:, prompt_len:].cpu()
    if path == "default":
        references[batch_size] = {name: (outputs[name], gaps[name]) for name in models}
    # compiled: each timed generate follows one of the same model (see `compare`); the ratio a one-model process sees
    settled = path == "static_compiled"
    full = compare({name: gen(name, n) for name in models}, args.device, warmup=0, repeats=args.gen_repeats,
                   same_before=settled)
    # ... and, for comparison with earlier runs, the plain alternation (every timed call follows the other model)
    switching = compare({name: gen(name, n) for name in models}, args.device, warmup=0,
                        repeats=args.gen_repeats) if settled else None
    # (every batch: the two models', and with same_len LLaVA's at AlignGPT's length)
    prefill = compare({name: gen(name, 1) for name in batches}, args.device, warmup=0, repeats=args.gen_repeats)

    def rates(name, key="median"):
        t_full, t_first = full[name].get(key), prefill[name].get(key)
        if t_full is None:
            return None, None
        decode = batch_size * (n - 1) / (t_full - t_first) if t_full > t_first and n > 1 else None
        return batch_size * n / t_full, decode

    for name in models:
        e2e, decode = rates(name)
        record = dict(
            case="generate", path=path, model=name, batch=batch_size, new_tokens=n,
            prompt_len=batches[name]["input_ids"].shape[1], generate_seconds=full[name]["median"],
            prefill_seconds=prefill[name]["median"], e2e_tok_s=e2e, decode_tok_s=decode,
            first_call_seconds=first_call[name], timed_after_same_model=settled,
            generate_times=full[name]["times"], prefill_times=prefill[name]["times"],
        )
        if "cpu_median" in full[name]:
            record.update(generate_cpu_seconds=full[name]["cpu_median"], prefill_cpu_seconds=prefill[name]["cpu_median"])
        if name == "aligngpt":
            prefill_r, full_r = ratios(prefill, "aligngpt", "llava"), ratios(full, "aligngpt", "llava")
            record.update({f"prefill_{k}": v for k, v in prefill_r.items()})
            if same_len:
                same_r = ratios(prefill, "aligngpt", "llava_same_len")
                record.update({f"prefill_same_len_{k}": v for k, v in same_r.items()},
                              prefill_same_len_seconds=prefill["llava_same_len"]["median"],
                              prefill_token_share=ratios(prefill, "llava_same_len", "llava")["ratio_paired"] - 1)
            record.update({f"generate_{k}": v for k, v in full_r.items()})
            # same number of tokens: throughput ratio = 1 / time ratio
            record["e2e_throughput_ratio"] = 1 / full_r["ratio"]
            record["e2e_throughput_ratio_paired"] = 1 / full_r["ratio_paired"]
            if switching is not None:
                record["e2e_throughput_ratio_alternating"] = 1 / ratios(switching, "aligngpt", "llava")["ratio"]
            (_, dec_a), (_, dec_b) = rates("aligngpt"), rates("llava")
            record["decode_throughput_ratio"] = dec_a / dec_b if dec_a and dec_b else None
            if "cpu_median" in full[name]:
                (_, dec_a), (_, dec_b) = rates("aligngpt", "cpu_median"), rates("llava", "cpu_median")
                record["decode_throughput_ratio_cpu_time"] = dec_a / dec_b if dec_a and dec_b else None
        reference = references.get(batch_size, {}).get(name)
        if path != "default" and reference is not None:
            record.update(greedy_agreement(outputs[name], *reference))
        if path == "static_compiled":
            record["graph_breaks_both_models"] = graph_breaks() - breaks_before
            record["graph_breaks"] = sum(breaks_by_model.get(name, {}).values())
            record["graph_break_reasons"] = dict(list(breaks_by_model.get(name, {}).items())[:8])
        rec.emit(**record)


# ops that launch no kernel and copy nothing (views, and `lift_fresh`: a tensor made from a NumPy array)
VIEW_OPS = {"view", "unsqueeze", "squeeze", "expand", "t", "select", "slice", "transpose", "permute", "as_strided",
            "alias", "_unsafe_view", "reshape", "detach", "split", "unbind", "lift_fresh"}


def case_profile(args, rec, aligngpt, dtype, image_size, num_image_tokens):
    from torch.profiler import ProfilerActivity, profile

    rows = train_rows(args.profile_batch, num_image_tokens, seed=500)
    batch = batch_for(args, rows, image_size, dtype, "right", False, 501, ["aligngpt"])["aligngpt"]
    inner = aligngpt.model
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    with torch.no_grad():
        image_features = torch.stack(list(inner.get_image_features(
            pixel_values=batch["pixel_values"], return_dict=True).pooler_output)).to(dtype)
        for _ in range(3):
            alignment_path(inner, batch["input_ids"], batch["attention_mask"], image_features)
        with profile(activities=activities) as prof:
            alignment_path(inner, batch["input_ids"], batch["attention_mask"], image_features)
        with OpLog() as oplog:
            alignment_path(inner, batch["input_ids"], batch["attention_mask"], image_features)
        # the ops on the model's device (on a GPU: the launches and copies; the model's CPU-side bookkeeping is out)
        device_ops = oplog.on(torch.device(args.device).type)
        compute_ops = [op for op in device_ops if op not in VIEW_OPS]
        host_ops = [op for op in oplog.ops if op not in VIEW_OPS] if not args.device.startswith("cpu") else []
        synchronize(args.device)
        events = prof.key_averages()
        log(f"\n=== alignment path, batch {args.profile_batch} (aten ops) ===")
        log(events.table(sort_by=sort, row_limit=40))
        ops = [e for e in events if e.key.startswith("aten::")]
        syncs = [e.key for e in events if e.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                     "cudaDeviceSynchronize")]
        rec.emit(case="profile_alignment_path", model="aligngpt", batch=args.profile_batch,
                 distinct_aten_ops=len(ops), aten_calls=sum(e.count for e in ops),
                 compute_ops=len(compute_ops), compute_op_names=" ".join(compute_ops),
                 all_ops_with_cpu_side=len(host_ops) or None,
                 host_syncs={k: next(e.count for e in events if e.key == k) for k in set(syncs)})
        aligngpt(**batch, use_cache=False, logits_to_keep=1)
        with profile(activities=activities) as prof:
            aligngpt(**batch, use_cache=False, logits_to_keep=1)
        synchronize(args.device)
        log(f"\n=== AlignGPT forward, batch {args.profile_batch} ===")
        log(prof.key_averages().table(sort_by=sort, row_limit=25))


# ----------------------------------------------------------------------------------------------------------------


def summarize(path: str) -> str:
    """Markdown tables of a JSON-lines file written by this script (`--summarize FILE`)."""
    import json

    records = [json.loads(line) for line in open(path) if line.strip()]
    by = {}
    for r in records:
        by.setdefault(r["case"], []).append(r)
    lines = []
    for m in by.get("machine", []):
        where = m.get("gpu") or (f"{m['cpu']} ({m.get('cpu_id', '')}; {m['torch_threads']} torch threads, "
                                 f"{m['cpu_count']} CPUs)")
        lines.append(f"Machine: {where}; torch {m['torch']}, transformers {m['transformers']}, "
                     f"{m['shapes']} shapes, {m['dtype']}, attention {m['attn']}.  ")
        lines.append(f"Command: `{m['command']}`")
    for b in by.get("build", []):
        lines.append(f"\nModels: LLM {b['text_layers']} layers x {b['hidden']}, tower {b['vision_layers']} layers, "
                     f"{b['image_tokens']} image tokens; {b['llava_params'] / 1e6:.1f} M shared parameters, "
                     f"{b['aligngpt_own_params']} AlignGPT-only.\n")

    def fmt(x, digits=3):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    def pick(rows, model, **match):
        for r in rows:
            if r.get("model") == model and all(r.get(k) == v for k, v in match.items()):
                return r
        return {}

    lines.append("| case | batch | seq (LLaVA / AlignGPT) | LLaVA | AlignGPT | AlignGPT / LLaVA (median; paired; CPU time) |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    fwd = by.get("forward", [])
    if fwd:
        a, l, s_ = pick(fwd, "aligngpt"), pick(fwd, "llava"), pick(fwd, "llava_same_len")
        lines.append(f"| forward (no grad), s | 1 | {l.get('seq_len')} / {a.get('seq_len')} | {fmt(l.get('seconds'))} | "
                     f"{fmt(a.get('seconds'))} | {fmt(l.get('aligngpt_ratio'))}; {fmt(l.get('aligngpt_ratio_paired'))}; "
                     f"{fmt(l.get('aligngpt_ratio_cpu_time'))} |")
        lines.append(f"| forward vs LLaVA at AlignGPT's length, s | 1 | {s_.get('seq_len')} / {a.get('seq_len')} | "
                     f"{fmt(s_.get('seconds'))} | {fmt(a.get('seconds'))} | {fmt(s_.get('aligngpt_ratio'))}; "
                     f"{fmt(s_.get('aligngpt_ratio_paired'))}; {fmt(s_.get('aligngpt_ratio_cpu_time'))} |")
    for r in by.get("train_step", []):
        if r["model"] != "aligngpt":
            continue
        l = pick(by["train_step"], "llava", batch=r["batch"])
        lines.append(f"| train step (fwd + bwd), s{' , checkpointing' if r.get('checkpointing') else ''} | "
                     f"{r['batch']} ({r['text_only_rows']} text-only) | {l.get('seq_len')} / {r['seq_len']} | "
                     f"{fmt(l.get('seconds'))} | {fmt(r['seconds'])} | {fmt(r.get('ratio'))}; "
                     f"{fmt(r.get('ratio_paired'))}; {fmt(r.get('ratio_cpu_time'))} |")
    for r in by.get("generate", []):
        if r.get("model") != "aligngpt":
            if r.get("skipped") or r.get("error"):
                lines.append(f"| generate {r.get('path')} | {r.get('batch')} | | | | "
                             f"{r.get('skipped') or r.get('error')} |")
            continue
        l = pick(by["generate"], "llava", batch=r["batch"], path=r["path"])
        seq = f"{l.get('prompt_len')} / {r['prompt_len']}"
        lines.append(f"| prefill ({r['path']}), s | {r['batch']} | {seq} | {fmt(l.get('prefill_seconds'))} | "
                     f"{fmt(r['prefill_seconds'])} | {fmt(r.get('prefill_ratio'))}; {fmt(r.get('prefill_ratio_paired'))}; "
                     f"{fmt(r.get('prefill_ratio_cpu_time'))} |")
        if "prefill_same_len_ratio" in r:
            lines.append(f"| prefill ({r['path']}) vs LLaVA at AlignGPT's length, s | {r['batch']} | "
                         f"{r['prompt_len']} / {r['prompt_len']} | {fmt(r.get('prefill_same_len_seconds'))} | "
                         f"{fmt(r['prefill_seconds'])} | {fmt(r['prefill_same_len_ratio'])}; "
                         f"{fmt(r.get('prefill_same_len_ratio_paired'))}; - |")
        lines.append(f"| generate {r['new_tokens']} tokens ({r['path']}), tokens/s end to end | {r['batch']} | {seq} | "
                     f"{fmt(l.get('e2e_tok_s'))} | {fmt(r['e2e_tok_s'])} | {fmt(r.get('e2e_throughput_ratio'))}; "
                     f"{fmt(r.get('e2e_throughput_ratio_paired'))}; - (throughput: higher is better) |")
        greedy = ""
        if "greedy_equal" in r:
            greedy = (f"; greedy ids = default path: AlignGPT {r['greedy_rows_equal']}/{r['batch']} rows, "
                      f"LLaVA {l.get('greedy_rows_equal')}/{r['batch']}")
            if "greedy_first_divergence_step" in r:
                greedy += (f" (AlignGPT first differs at step {r['greedy_first_divergence_step']}, where the default "
                           f"path's top-2 logit gap was {fmt(r['ref_logit_gap_at_divergence_max'])}, median gap "
                           f"{fmt(r['ref_logit_gap_median'])})")
        if r["path"] == "static_compiled":
            greedy += f"; compile + first call {fmt(r['first_call_seconds'])} s, graph breaks {r.get('graph_breaks')}"
        lines.append(f"| decoding ({r['path']}), tokens/s | {r['batch']} | {seq} | {fmt(l.get('decode_tok_s'))} | "
                     f"{fmt(r.get('decode_tok_s'))} | {fmt(r.get('decode_throughput_ratio'))}; -; "
                     f"{fmt(r.get('decode_throughput_ratio_cpu_time'))}{greedy} |")
    for r in by.get("train", []) + [r for r in by.get("generate", []) if r.get("skipped") and r.get("model") is None]:
        if r.get("skipped") and r["case"] == "train":
            lines.append(f"| train step | {r.get('batch')} | | | | {r['skipped']} |")
    extra = []
    for r in by.get("gate_in_forward", []):
        extra.append(f"- gate in the forward: adaptive / global mode = {fmt(r['ratio_paired'])} (paired), "
                     f"{100 * r['share_of_forward']:.2f}% of AlignGPT's batch-1 forward ({r['note']})")
    for key in ("alignment_path", "extra_token", "alignment_cost"):
        for r in by.get(key, []):
            expected = f", 1/seq = {100 * r['expected_share']:.2f}%" if "expected_share" in r else ""
            extra.append(f"- {key}: {fmt(r['seconds'] if key != 'alignment_path' else r['extra_seconds'])} s = "
                         f"{100 * r['share_of_forward']:.2f}% of LLaVA's batch-1 forward{expected} "
                         f"({r.get('note', r.get('goal', ''))})")
    for r in by.get("explain_decode", []):
        extra.append(f"- torch._dynamo.explain of a {r['model']} decoding step (batch {r['batch']}): {r['graph_count']} "
                     f"graph(s), {r['graph_break_count']} break(s), {r['op_count']} ops"
                     + (f"; reasons: {r['break_reasons']}" if r["break_reasons"] else ""))
    for r in by.get("generate", []):
        if r.get("graph_break_reasons"):
            extra.append(f"- graph breaks of {r['model']}'s compiled decoding (batch {r['batch']}): "
                         f"{r['graph_break_reasons']}")
    for r in by.get("profile_alignment_path", []):
        extra.append(f"- alignment path, batch {r['batch']}: {r['compute_ops']} non-view aten ops, host syncs "
                     f"{r['host_syncs']}: {r['compute_op_names']}")
    for r in by.get("done", []):
        extra.append(f"- total run time {fmt(r['total_seconds'])} s"
                     + (f", peak GPU memory {fmt(r['peak_memory_gib'])} GiB" if r.get("peak_memory_gib") else ""))
    return "\n".join(lines + [""] + extra)


def over_budget(args, rec, case, batch, path=None) -> bool:
    if args.budget_s is None:
        return False
    elapsed = time.monotonic() - args.start
    estimate = args.estimates.get(case if path is None else f"{case}:{path}", 0) * (2 if batch > 4 else 1)
    if elapsed + estimate > args.budget_s:
        rec.emit(case=case, path=path, batch=batch, skipped=f"time budget: {elapsed:.0f}s spent, ~{estimate}s needed, "
                 f"budget {args.budget_s}s")
        return True
    return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="small (CPU default), 7b (GPU default) or tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="float32 on CPU, bfloat16 on GPU by default")
    p.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    p.add_argument("--quick", action="store_true", help="fewer repeats and new tokens (CPU: under two minutes)")
    p.add_argument("--cases", default="forward,train,generate", help="comma list of forward,train,generate,profile")
    p.add_argument("--profile", action="store_true", help="add the profile case")
    p.add_argument("--profile-batch", type=int, default=16)
    p.add_argument("--train-batches", default=None, help="default 1,16 (--quick on CPU: 1,4)")
    p.add_argument("--gen-batches", default=None, help="default 1,32 (--quick on CPU: 1,4)")
    p.add_argument("--paths", default=None,
                   help="generation paths: default,static,static_compiled (CPU default: default,static; "
                        "GPU: default,static_compiled)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per generate (64 GPU, 32 CPU)")
    p.add_argument("--question-max", type=int, default=29, help="question tokens: LLaVA prompt = 611 + this")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of forward cases")
    p.add_argument("--train-repeats", type=int, default=None)
    p.add_argument("--gen-repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing in the training step (auto: on for 7b, which needs it at batch 16)")
    p.add_argument("--cpu-compile", action="store_true", help="also compile the decoding step on CPU")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--fullgraph", action="store_true")
    p.add_argument("--compile-first", choices=["llava", "aligngpt"], default="llava",
                   help="which model's decoding step is compiled first (the second reuses shared compiled code)")
    p.add_argument("--explain", action="store_true",
                   help="torch._dynamo.explain of one decoding step of each model (graphs, breaks, reasons)")
    p.add_argument("--layers", type=int, default=None, help="override the LLM's layer count (smoke tests)")
    p.add_argument("--vision-layers", type=int, default=None, help="override the tower's layer count (smoke tests)")
    p.add_argument("--image-size", type=int, default=None,
                   help="override the tower's image size (336: 576 image tokens; --quick on CPU: 112, 64 tokens)")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining cases past this many seconds")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--summarize", default=None, metavar="FILE", help="print markdown tables of a JSON-lines file")
    args = p.parse_args(argv)
    if args.summarize:
        return args

    cuda = args.device.startswith("cuda")
    args.shapes = args.shapes or ("7b" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.cases = [c for c in args.cases.split(",") if c] + (["profile"] if args.profile else [])
    small_quick = args.quick and not cuda
    args.train_batches = [int(b) for b in (args.train_batches or ("1,4" if small_quick else "1,16")).split(",") if b]
    args.gen_batches = [int(b) for b in (args.gen_batches or ("1,4" if small_quick else "1,32")).split(",") if b]
    if args.paths is None:
        args.paths = "default,static_compiled" if cuda else "default,static" + (",static_compiled" if args.cpu_compile else "")
    args.paths = args.paths.split(",")
    quick = args.quick
    if quick and not cuda and args.image_size is None:
        args.image_size = 112  # 64 image tokens instead of 576: same code paths, a fifth of the sequence
    args.new_tokens = args.new_tokens or (64 if cuda else (8 if quick else 32))
    args.repeats = args.repeats or (11 if cuda else (3 if quick else 7))
    args.train_repeats = args.train_repeats or (5 if cuda else (1 if quick else 5))
    args.gen_repeats = args.gen_repeats or (4 if cuda else (2 if quick else 5))
    args.checkpointing = args.checkpointing == "on" or (args.checkpointing == "auto" and args.shapes == "7b")
    # rough seconds per case on an H100 at 7B shapes, for --budget-s (batch > 4 doubles them)
    # (an H200 run took 87 s for everything but batch-32 compiled decoding: build 1 s, train 1.4 s a step at batch 16,
    # compile + first call 24 s)
    # (compiled: + the settled and the alternating timings, ~10 s more)
    args.estimates = {"train": 12, "generate:default": 15, "generate:static": 15, "generate:static_compiled": 45}
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    args.start = time.monotonic()
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    # two models x two batch sizes of compiled decoding steps share code objects (`can_return_tuple`'s wrapper)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    dtype = getattr(torch, args.dtype)
    info = machine_info(args.device)
    if args.attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            Recorder(args.out).emit(case="machine", attn=args.attn, skipped="flash_attn is not installed", **info)
            return
    rec = Recorder(args.out, shapes=args.shapes, device=info.get("gpu", info["cpu"]), dtype=args.dtype,
                   attn=args.attn)
    rec.emit(case="machine", command=" ".join(["python", "benchmarks/bench_model.py"] + (argv or sys.argv[1:])), **info)

    t0 = time.perf_counter()
    llava, aligngpt = build_models(args, dtype)
    synchronize(args.device)
    n_params = sum(p.numel() for p in llava.parameters())
    own = sum(p.numel() for n, p in aligngpt.named_parameters() if ".alignment_" in n)
    vision = aligngpt.config.vision_config
    image_size = vision.image_size
    num_image_tokens = aligngpt.config.num_image_tokens
    rec.emit(case="build", seconds=time.perf_counter() - t0, llava_params=n_params, aligngpt_own_params=own,
             text_layers=aligngpt.config.text_config.num_hidden_layers, hidden=aligngpt.config.text_config.hidden_size,
             vision_layers=vision.num_hidden_layers, image_tokens=num_image_tokens,
             memory_gib=torch.cuda.memory_allocated() / 2**30 if cuda else None)

    # same weights: a text-only row gives identical logits in both models
    with torch.no_grad():
        ids = torch.tensor([[BOS] + list(range(100, 140))], device=args.device)
        keep = torch.ones(VOCAB, dtype=torch.bool, device=args.device)
        keep[[IMAGE_ID, ALIGN_ID]] = False  # AlignGPT's suppressed placeholder columns
        same = (llava(input_ids=ids).logits - aligngpt(input_ids=ids).logits)[..., keep].abs().max().item()
    rec.emit(case="check_shared_weights", max_abs_logit_diff_text_only=same)

    def guarded(case, fn, *fn_args):  # one failing case (an OOM, a compile error) does not stop the others
        try:
            fn(*fn_args)
        except Exception as error:  # noqa: BLE001
            rec.emit(case=case, error=f"{type(error).__name__}: {str(error)[:500]}")
            if cuda:
                torch.cuda.empty_cache()

    if "forward" in args.cases:
        guarded("forward", case_forward, args, rec, llava, aligngpt, dtype, image_size, num_image_tokens)
    if "train" in args.cases:
        guarded("train", case_train, args, rec, llava, aligngpt, dtype, image_size, num_image_tokens)
    if "generate" in args.cases:
        references = {}
        # every batch size of one path before the next path: the eager default path first (its token ids are the
        # reference), the compiled path (compilation time is the least predictable) last
        if args.explain:
            guarded("explain_decode", explain_decode, args, rec, llava, aligngpt, dtype, image_size, num_image_tokens,
                    args.gen_batches[0])
        for path in args.paths:
            for batch_size in args.gen_batches:
                if over_budget(args, rec, "generate", batch_size, path):
                    continue
                try:
                    case_generate(args, rec, llava, aligngpt, dtype, image_size, num_image_tokens, batch_size,
                                  path, references)
                except Exception as error:  # noqa: BLE001 - report and go on with the other cases
                    rec.emit(case="generate", path=path, batch=batch_size,
                             error=f"{type(error).__name__}: {str(error)[:500]}")
                    if cuda:
                        torch.cuda.empty_cache()
    if "profile" in args.cases:
        guarded("profile", case_profile, args, rec, aligngpt, dtype, image_size, num_image_tokens)
    rec.emit(case="done", total_seconds=time.monotonic() - args.start,
             peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


if __name__ == "__main__":
    main()
