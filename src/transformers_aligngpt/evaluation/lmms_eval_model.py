"""lmms-eval model `aligngpt`: AlignGPT checkpoints (this package's format) evaluated like the original code did.

    lmms-eval --model aligngpt --model_args pretrained=PATH_OR_HUB_ID[,ARG=VALUE...] --tasks pope,mme --batch_size 8

What it does, per request batch:
- the question goes into the Vicuna v1 template of the checkpoint's processor
  (`"{system} USER: <image>\\n{question} ASSISTANT:"`); rows without an image get no `<image>` (and so no
  alignment token): text-only questions are answered as text-only chats;
- images are padded to a square with the CLIP mean colour (the original `image_aspect_ratio="pad"`), except for
  the ScienceQA tasks, which the original code evaluated without padding (see `prompts.py`);
- batches are left-padded and decoded greedily (sampling only when a task sets `do_sample: true` *and* a
  temperature > 0), up to the model's end-of-sequence token; answers are stripped as the original scripts did.

Model arguments (`--model_args`, comma separated):
    pretrained           local folder or Hub id of a checkpoint saved by this package (required)
    revision             Hub revision
    device               "cuda", "cuda:1", "cpu" ... (default: cuda when available, else cpu)
    dtype                "auto" (float16 on a GPU, as the original evaluation; float32 on a CPU), "bfloat16",
                         "float16", "float32"
    batch_size           rows per generate call (the CLI's --batch_size sets it too)
    device_map           passed to from_pretrained (e.g. "auto" to split a large model over several GPUs)
    attn_implementation  "sdpa", "eager", "flash_attention_2" ...
    trust_remote_code    load through the checkpoint's own code (its auto_map) instead of this package (default false)
    alignment_mode       adaptive (the paper) | global | local | mean | fixed: how the alignment vector is built
    alignment_level      a level 0..N-1 used for every image; implies alignment_mode=fixed
    image_aspect_ratio   auto (default: pad, original size for ScienceQA) | pad | original
    prompt_style         aligngpt (default: the original evaluation's prompts where lmms-eval's differ, see
                         `prompts.py`) | lmms_eval (lmms-eval's default prompts for every task)
    system_prompt        replaces the Vicuna system prompt (the text, or a file holding it)
    max_new_tokens       used when a task sets none (default 1024)
    stop_at_until        also cut answers at the task's `until` strings (default false: like the original
                         scripts and lmms-eval's `llava`, generation ends at the end-of-sequence token only)
    use_cache            default true
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance

try:  # lmms-eval >= 0.7.3: the evaluator unwraps every model output, and a bare (float, bool) becomes a string
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # (earlier releases take the tuples as they are)
    GenerationResult = None
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..checkpoint_code import from_pretrained
from ..configuration_aligngpt import ALIGNMENT_MODES
from .prompts import ORIGINAL_ASPECT_TASKS, original_prompt

IMAGE_ASPECT_RATIOS = ("auto", "pad", "original")
PROMPT_STYLES = ("aligngpt", "lmms_eval")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class AlignGPTLmmsEval(lmms):
    """lmms-eval "simple" model for AlignGPT checkpoints; see the module docstring for the model arguments."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        alignment_mode: str | None = None,
        alignment_level: int | None = None,
        image_aspect_ratio: str = "auto",
        prompt_style: str = "aligngpt",
        system_prompt: str | None = None,
        max_new_tokens: int = 1024,
        stop_at_until: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown model_args for aligngpt: {sorted(kwargs)}. See `transformers_aligngpt.evaluation."
                "lmms_eval_model` for the accepted ones."
            )
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be an integer for aligngpt (no 'auto'), got {batch_size!r}") from None

        # Register the Auto classes (importing the package does it), unless the checkpoint's own code is wanted.
        import transformers_aligngpt  # noqa: F401

        accelerator = Accelerator()
        if accelerator.num_processes > 1 and not device_map:
            # data parallel (`accelerate launch -m lmms_eval ...`): one full model per process
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator

        if dtype == "auto":
            torch_dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")

        config_overrides = {}
        if alignment_level is not None:
            if alignment_mode not in (None, "fixed"):
                raise ValueError(
                    f"alignment_level={alignment_level} needs alignment_mode=fixed, got {alignment_mode!r}"
                )
            alignment_mode = "fixed"
            config_overrides["fixed_alignment_level"] = int(alignment_level)
        if alignment_mode is not None:
            if alignment_mode not in ALIGNMENT_MODES:
                raise ValueError(f"alignment_mode must be one of {ALIGNMENT_MODES}, got {alignment_mode!r}")
            config_overrides["alignment_mode"] = alignment_mode

        load_kwargs = {"revision": revision, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if device_map:
            load_kwargs["device_map"] = device_map
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        # (with trust_remote_code the checkpoint's own classes, which transformers would skip for the registered ones)
        model = from_pretrained(AutoModelForImageTextToText, pretrained, **load_kwargs, **config_overrides)
        if getattr(model.config, "model_type", None) != "aligngpt":
            raise ValueError(f"{pretrained} is a {model.config.model_type!r} checkpoint, not an AlignGPT one.")
        model.config.validate_alignment()
        if not device_map:
            model.to(self._device)
        self._model = model.eval()
        self.pretrained = pretrained

        self.processor = from_pretrained(
            AutoProcessor, pretrained, revision=revision, trust_remote_code=trust_remote_code
        )
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.unk_token or self._tokenizer.eos_token
        self.image_token = self.processor.image_token
        self.image_aspect_ratio = image_aspect_ratio
        self.prompt_style = prompt_style
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.max_new_tokens = int(max_new_tokens)
        self.stop_at_until = bool(stop_at_until)
        self.use_cache = bool(use_cache)
        self._logged_tasks: set[str] = set()
        eval_logger.info(
            f"aligngpt: {pretrained} on {self._device} ({torch_dtype}), alignment_mode="
            f"{model.config.alignment_mode}"
            + (f" (level {model.config.fixed_alignment_level})" if model.config.alignment_mode == "fixed" else "")
            + f", batch_size={self.batch_size_per_gpu}, image_aspect_ratio={image_aspect_ratio}, "
            f"prompt_style={prompt_style}"
        )

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------ prompts
    def question_text(self, context: str, task: str, doc: dict) -> str:
        """The question for `doc`: lmms-eval's `context`, or the original evaluation's prompt (`prompts.py`)."""
        if self.prompt_style == "aligngpt":
            original = original_prompt(task, doc)
            if original is not None:
                return original
        return context

    def build_prompt(self, question: str, num_images: int) -> str:
        """The Vicuna v1 prompt, ending in "ASSISTANT:"; one `<image>` item per image before the question (unless
        the question places its own `<image>` tokens)."""
        content = []
        if num_images and self.image_token not in question:
            content += [{"type": "image"}] * num_images
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def pads_images(self, task: str) -> bool:
        if self.image_aspect_ratio == "auto":
            return task not in ORIGINAL_ASPECT_TASKS
        return self.image_aspect_ratio == "pad"

    def encode(self, prompts: list[str], images: list[Image.Image], pad_to_square: bool):
        """Processor call: tokens (left-padded), `<image>` / `<align>` placeholders, pixel values."""
        kwargs = {}
        if images and hasattr(self.processor.image_processor, "do_pad"):
            kwargs["do_pad"] = pad_to_square
        inputs = self.processor(
            text=prompts, images=images or None, return_tensors="pt", padding=True, **kwargs
        )
        inputs = inputs.to(self._model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    @staticmethod
    def _visuals(doc_to_visual, doc) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for visual in visuals:
            if visual is None:
                continue
            if not isinstance(visual, Image.Image):
                raise ValueError(f"aligngpt evaluates images only; got a {type(visual).__name__} visual")
            out.append(visual.convert("RGB"))
        return out

    def _log_prompt_once(self, task: str, prompt: str) -> None:
        if task not in self._logged_tasks:
            self._logged_tasks.add(task)
            shown = prompt.replace(self.image_token, "").replace(self.processor.alignment_token, "")
            eval_logger.info(f"aligngpt prompt for task {task!r}: {shown!r}")

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        rows = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            images = self._visuals(doc_to_visual, doc)
            prompt = self.build_prompt(self.question_text(context, task, doc), len(images))
            rows.append((index, task, prompt, images, dict(gen_kwargs)))

        # One generate call per batch of requests that share a task and generation settings; longest prompts first
        # (any memory error shows up at once), answers put back in request order.
        groups = defaultdict(list)
        for row in rows:
            groups[(row[1], json.dumps(row[4], sort_keys=True, default=str))].append(row)
        batches = []
        for group in groups.values():
            group.sort(key=lambda row: -len(row[2]))
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]

        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="aligngpt responding")
        for batch in batches:
            task, gen_kwargs = batch[0][1], batch[0][4]
            prompts = [row[2] for row in batch]
            images = [image for row in batch for image in row[3]]
            self._log_prompt_once(task, prompts[0])
            for row, text in zip(batch, self._generate(prompts, images, gen_kwargs, task)):
                answers[row[0]] = text
                self.cache_hook.add_partial("generate_until", (row[2], row[4]), text)
            progress.update(len(batch))
        progress.close()
        return answers

    @torch.inference_mode()
    def _generate(self, prompts: list[str], images: list[Image.Image], gen_kwargs: dict, task: str) -> list[str]:
        until = gen_kwargs.pop("until", None)
        if isinstance(until, str):
            until = [until]
        gen_kwargs.pop("image_aspect_ratio", None)  # the image handling is decided by `image_aspect_ratio` above
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        generate_kwargs = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
            "use_cache": self.use_cache,
            "pad_token_id": self._tokenizer.pad_token_id,
            "eos_token_id": self._tokenizer.eos_token_id,
        }
        if do_sample:
            generate_kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generate_kwargs["top_p"] = float(gen_kwargs["top_p"])

        inputs = self.encode(prompts, images, self.pads_images(task))
        output = self._model.generate(**inputs, **generate_kwargs)
        texts = self._tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = []
        for text in texts:
            if self.stop_at_until and until:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    # ------------------------------------------------------------------------------------------ likelihood
    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of the continuation's tokens after the Vicuna prompt, and whether greedy
        decoding would produce exactly them."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="aligngpt loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = self._visuals(doc_to_visual, doc)
            prompt = self.build_prompt(self.question_text(context, task, doc), len(images))
            separator = "" if continuation.startswith(" ") else " "
            pad = self.pads_images(task)
            prompt_ids = self.encode([prompt], images, pad)["input_ids"][0]
            inputs = self.encode([prompt + separator + continuation], images, pad)
            full_ids = inputs["input_ids"][0]
            start = 0  # tokens shared by the prompt alone and prompt + continuation
            while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
                start += 1
            # the gate reads the shared prompt only, as in generation: every candidate is scored under the same
            # <align> vector, not one mixed from its own text
            logits = self._model(**inputs, gate_prompt_length=start).logits[0, start - 1 : -1].float()
            targets = full_ids[start:]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            greedy = bool((logits.argmax(-1) == targets).all())
            results.append((float(logprobs.sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        if GenerationResult is not None:
            # `unwrap_generation_output` turns anything but a str or a (str, ...) pair into `str(output)`, so that
            # multiple_choice scoring (`lls, is_greedy = zip(*results)`) then fails; a GenerationResult's `text`
            # passes through unchanged, which carries the pair to the task
            return [GenerationResult(text=result) for result in results]
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("aligngpt answers single-round questions (the paper's benchmarks) only.")


__all__ = ["AlignGPTLmmsEval", "IMAGE_ASPECT_RATIOS", "PROMPT_STYLES"]
