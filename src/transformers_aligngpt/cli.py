"""`aligngpt`: the command line of transformers-aligngpt.

Subcommands (each has its own `--help`):

    aligngpt demo       train a tiny AlignGPT on the built-in demo data end to end, in minutes on a CPU
    aligngpt levels     CLIP-score image-caption pairs and bucket them into alignment levels (phase 1 data)
    aligngpt pretrain   phase 1: train the projector and the alignment embeddings on leveled captions
    aligngpt sft        phase 2: instruction tuning (projector, gate and LLM) with TRL
    aligngpt chat       talk to a checkpoint about an image
    aligngpt convert    convert a checkpoint of the original AlignGPT code
    aligngpt push       upload a checkpoint (model, processor, remote code, model card) to the Hugging Face Hub

Flags are shared where they mean the same thing: `--model` (a checkpoint folder or Hub id to use), `--output` (a
folder to write), `--data` / `--image-folder` (LLaVA-layout JSON and its images), `--clip`, `--vision-tower`,
`--language-model` (Hub ids or folders), `--device`, `--dtype`, `--seed`.

Heavy imports happen inside the subcommands, and subcommands that another module defines are registered through
its `add_*_subparser` function.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

DTYPES = ("auto", "float32", "bfloat16", "float16")
EPILOG = "Run `aligngpt <subcommand> --help` for the flags of a subcommand."


class CommandError(Exception):
    """A problem with the user's input, reported as `aligngpt <cmd>: error: ...` (exit status 2)."""


def looks_like_path(value: str) -> bool:
    """A local path rather than a Hub id (`user/name` or `name`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def check_model_source(flag: str, value: str | None) -> str | None:
    """A `--model`-like value that is clearly a local path must exist (a Hub id is checked when it is loaded);
    returns it with `~` expanded, as the loaders need it."""
    if value and looks_like_path(value):
        value = os.path.expanduser(value)
        if not os.path.exists(value):
            raise CommandError(f"{flag} {value}: no such folder (and not a Hub id)")
    return value


def check_model_sources(args: argparse.Namespace, *flags: str) -> None:
    """`check_model_source` for each `--flag` of the parsed `args`, whose values it replaces (`~` expanded)."""
    for flag in flags:
        name = flag[2:].replace("-", "_")
        setattr(args, name, check_model_source(flag, getattr(args, name)))


@contextlib.contextmanager
def loading(flag: str, value: str):
    """Turns the OSError of a failed `from_pretrained` (no such folder here, no such or unreachable Hub repo) into
    a one-line CommandError naming the flag."""
    try:
        yield
    except OSError as error:
        raise CommandError(
            f"{flag} {value}: cannot load it: not a checkpoint folder here, and not loadable as a Hub id ({error})"
        ) from error


# ---------------------------------------------------------------------------------------------- chat
def add_chat_subparser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="interactive chat with a checkpoint about an image",
        description=(
            "Loads a checkpoint with AutoModelForImageTextToText / AutoProcessor and keeps a conversation about one "
            "image. Type a question and press enter; lines are read from stdin, so questions can also be piped in. "
            "Commands: /image FILE (start over with another image), /reset (forget the conversation), /gate (toggle "
            "printing the gate's weights), /quit (or end of input)."
        ),
        epilog="example: aligngpt chat --model outputs/demo/checkpoint --image scene.png",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--image", help="image file the conversation is about (omit for a text-only chat)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="answer length limit (256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--system", default=None, help="system prompt (default: the Vicuna v1 prompt)")
    parser.add_argument("--show-gate", action="store_true", help="print the gate's weights per level with answers")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the code stored with the checkpoint (its auto_map) instead of this package's")
    parser.set_defaults(func=run_chat)
    return parser


def run_chat(args: argparse.Namespace) -> int:
    if args.image and not os.path.isfile(args.image):
        raise CommandError(f"--image {args.image}: no such file")
    check_model_sources(args, "--model")
    session = ChatSession.load(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        system_prompt=args.system,
    )
    if args.image:
        session.set_image(args.image)
    return session.repl(
        sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        show_gate=args.show_gate,
    )


class ChatSession:
    """A conversation with a checkpoint: one image (optional), the turns so far, greedy or sampled answers."""

    def __init__(self, model, processor, system_prompt: str | None = None):
        self.model, self.processor, self.system_prompt = model, processor, system_prompt
        self.image = None
        self.messages: list[dict] = []

    @classmethod
    def load(cls, model: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
             system_prompt: str | None = None) -> ChatSession:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from . import AlignGPTConfig  # noqa: F401  (registers AlignGPT with the Auto classes)
        from .checkpoint_code import from_pretrained

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            processor = from_pretrained(AutoProcessor, model, trust_remote_code=trust_remote_code)
            loaded = from_pretrained(AutoModelForImageTextToText, model, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
        except OSError as error:
            raise CommandError(f"--model {model}: cannot load a checkpoint from there ({error})") from error
        except ValueError as error:  # transformers lists every config class it knows: the first line says enough
            raise CommandError(
                f"--model {model}: not an image-text-to-text checkpoint "
                f"({str(error).splitlines()[0][:300]})"
            ) from error
        return cls(loaded.to(device).eval(), processor, system_prompt)

    def set_image(self, path: str) -> None:
        """Starts a new conversation about the image at `path`."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                self.image = image.convert("RGB")
        except IsADirectoryError:
            raise CommandError(f"image {path}: is a folder, not an image file") from None
        except FileNotFoundError:
            raise CommandError(f"image {path}: no such file") from None
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(f"image {path}: not a readable image ({error})") from None
        self.reset()

    def reset(self) -> None:
        self.messages = []

    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
            show_gate: bool = False):
        """(answer, gate weights per local level or None) for the next user turn; the turn is kept."""
        import torch

        content = [{"type": "text", "text": question}]
        if self.image is not None and not self.messages:
            content.insert(0, {"type": "image"})  # the image goes with the first question, as in training
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = [*self.messages, {"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(system + messages, add_generation_prompt=True)
        images = [self.image] if self.image is not None else None
        inputs = self.processor(images=images, text=prompt, return_tensors="pt").to(self.model.device)
        generation = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            generation.update(temperature=temperature, **({"top_p": top_p} if top_p is not None else {}))
        with torch.inference_mode():
            output = self.model.generate(**inputs, **generation)
            weights = None
            if show_gate and images is not None:
                weights = self.model(**inputs, logits_to_keep=1).alignment_weights
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        answer = self.processor.decode(new_tokens, skip_special_tokens=True).strip()
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer, (None if weights is None else weights[0].float().tolist())

    def repl(self, stdin, stdout, show_gate: bool = False, **generation) -> int:
        interactive = stdin.isatty()
        if interactive:
            about = "the image" if self.image is not None else "anything (no image)"
            print(f"Ask about {about}. /image FILE, /reset, /gate, /quit.", file=stdout)
        while True:
            if interactive:
                print("USER: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if not interactive:
                print(f"USER: {line}", file=stdout)
            word = line.split(maxsplit=1)[0]
            if word in ("/quit", "/exit"):
                break
            if word == "/reset":
                self.reset()
                print("(conversation cleared)", file=stdout)
                continue
            if word == "/gate":
                show_gate = not show_gate
                print(f"(gate weights {'on' if show_gate else 'off'})", file=stdout)
                continue
            if word == "/image":
                path = line[len("/image"):].strip()
                if not path:
                    print("error: /image needs a file: /image FILE", file=stdout)
                    continue
                try:
                    self.set_image(path)
                    print("(new image; conversation cleared)", file=stdout)
                except CommandError as error:
                    print(f"error: {error}", file=stdout)
                continue
            if word.startswith("/") and word[1:].isalpha():
                # a mistyped command (`/imgae x.png`) would otherwise go to the model as a question
                print(f"error: unknown command {word} (commands: /image FILE, /reset, /gate, /quit)", file=stdout)
                continue
            try:
                answer, weights = self.ask(line, show_gate=show_gate, **generation)
            except ValueError as error:  # e.g. a question that holds the reserved <align> token
                print(f"error: {error}", file=stdout)
                continue
            print(f"ASSISTANT: {answer}", file=stdout, flush=True)
            if show_gate:
                if weights is None:
                    print("  (no gate weights: no image, or alignment_mode does not use the gate)", file=stdout)
                else:
                    print("  gate: " + " ".join(f"L{i}={w:.3f}" for i, w in enumerate(weights)), file=stdout)
        return 0


# ---------------------------------------------------------------------------------------------- push
def add_push_subparser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="upload a checkpoint with its processor, remote code and model card to the Hub",
        description=(
            "Stages the checkpoint (model, processor, the model code for trust_remote_code=True, and a model card "
            "filled with the architecture, training setup, alignment levels, gate statistics and evaluation "
            "results) and uploads it in one commit. Card facts are read from the checkpoint's "
            "aligngpt_card_info.json (the demo writes one) and from the flags below, which take precedence. "
            "--dry-run only writes the staged folder."
        ),
        epilog="example: aligngpt push --model outputs/demo/checkpoint --repo-id you/aligngpt-demo --private",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub id) to push")
    parser.add_argument("--repo-id", required=True, help="target repo, user/name")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default="Upload AlignGPT model, processor, remote code and model card")
    card = parser.add_argument_group("model card")
    card.add_argument("--card-info", default=None,
                      help="JSON file of card facts (default: <model>/aligngpt_card_info.json if present)")
    card.add_argument("--model-name", default=None, help="title of the card (default: the repo name)")
    card.add_argument("--license", default=None, help="license id for the metadata (default: the card info's, else "
                      "apache-2.0, with a warning for a converted checkpoint)")
    card.add_argument("--base-model", action="append", default=None, dest="base_models", metavar="ID",
                      help="a base model's Hub id (repeat for the vision tower and the LLM)")
    card.add_argument("--dataset", action="append", default=None, dest="datasets", metavar="ID",
                      help="a training dataset's Hub id (repeatable)")
    card.add_argument("--tag", action="append", default=None, dest="tags", metavar="TAG", help="extra tag")
    card.add_argument("--eval-results", default=None, metavar="FILE",
                      help="evaluation results JSON ({task: {metric: value}}, a list of {task, metric, value}, or an "
                      "lmms-eval results file)")
    stage = parser.add_argument_group("staging")
    stage.add_argument("--staging-dir", default=None, help="write the staged folder here, a new or empty folder "
                       "(all of it is uploaded; default: a temp folder)")
    stage.add_argument("--dry-run", action="store_true", help="stage only, upload nothing (needs --staging-dir)")
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .hub import (
        HubPushError,
        check_push_model,
        check_repo_id,
        check_staging_dir,
        load_card_info,
        normalize_eval_results,
        prepare_push_folder,
        push_to_hub,
    )

    # every input is checked before anything is loaded or staged (a 7B checkpoint takes minutes to stage)
    if args.dry_run and not args.staging_dir:
        raise CommandError("--dry-run needs --staging-dir (where to write the folder that would be uploaded)")
    try:
        check_repo_id(args.repo_id)
    except ValueError as error:
        raise CommandError(f"--repo-id {error}") from None
    if args.card_info:
        if not Path(args.card_info).is_file():
            raise CommandError(f"--card-info {args.card_info}: no such file")
        try:
            load_card_info(args.card_info)
        except ValueError as error:  # JSONDecodeError is a ValueError too
            raise CommandError(f"--card-info {args.card_info}: {error}") from None
    eval_results = None
    if args.eval_results:
        path = Path(args.eval_results)
        if not path.is_file():
            raise CommandError(f"--eval-results {path}: no such file")
        try:
            eval_results = json.loads(path.read_text(encoding="utf-8"))
            normalize_eval_results(eval_results)
        except (ValueError, TypeError, AttributeError) as error:
            raise CommandError(
                f"--eval-results {path}: not evaluation results ({error}); expected JSON {{task: {{metric: value}}}}, "
                "a list of {task, metric, value}, or an lmms-eval results file"
            ) from None
    model = check_model_source("--model", args.model)
    try:
        check_push_model(model)
    except ValueError as error:
        raise CommandError(f"--model {error}") from None
    try:
        check_staging_dir(args.staging_dir)
    except ValueError as error:
        raise CommandError(f"--staging-dir: {error}") from None

    card = {"model_name": args.model_name, "license": args.license, "base_models": args.base_models,
                "datasets": args.datasets, "tags": args.tags, "eval_results": eval_results}
    if args.dry_run:
        folder = prepare_push_folder(model, args.staging_dir, args.repo_id, card_info=args.card_info, **card)
        print(f"Staged {args.repo_id} in {folder} (dry run: nothing uploaded). Files:")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name}")
        return 0
    try:
        info = push_to_hub(
            model, args.repo_id, token=args.token, private=args.private, revision=args.revision,
            create_pr=args.create_pr, commit_message=args.commit_message, staging_dir=args.staging_dir,
            card_info=args.card_info, **card,
        )
    except HubPushError as error:
        raise CommandError(str(error)) from None
    print(f"Pushed to {getattr(info, 'commit_url', None) or info}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def add_demo_subparser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="the whole method end to end on the built-in demo data (a few minutes on a CPU)",
        description=(
            "On the demo data that ships with the package (synthetic scenes with captions of known quality): "
            "trains a tiny CLIP built from a config to score the captions, assigns alignment levels, builds a tiny "
            "AlignGPT (the CLIP's image tower + a tiny Llama built from a config and warmed up on the demo texts), "
            "runs phase 1 (pre-training with levels) and phase 2 (instruction tuning, TRL), saves a checkpoint, "
            "answers questions about held-out images and shows the gate's weights per level (table + PNG). Loss "
            "curves are written as JSON and PNG. Nothing is downloaded; about 5-6 minutes on one CPU thread (the "
            "default). With model ids or data paths the same pipeline runs on real models / data (the paper's "
            "learning rates then)."
        ),
        epilog="example: aligngpt demo --output outputs/demo",
    )
    parser.add_argument("--output", default="outputs/demo", help="folder for checkpoint, plots, logs (outputs/demo)")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (< 1 minute) to check the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--num-levels", type=_num_levels, default=8, help="number of alignment levels N (8)")
    real = parser.add_argument_group("real models and data (default: tiny models from configs, built-in data)")
    real.add_argument("--clip", default=None, help="CLIP/SigLIP scorer id or folder (default: train a tiny CLIP)")
    real.add_argument("--vision-tower", default=None, help="vision tower id or folder, e.g. "
                      "openai/clip-vit-large-patch14-336 (default: the image tower of the --clip scorer, as in "
                      "AlignGPT)")
    real.add_argument("--language-model", default=None, help="causal LM id or folder, e.g. lmsys/vicuna-7b-v1.5 "
                      "(default: a tiny Llama config with a BPE tokenizer trained on the demo texts)")
    real.add_argument("--data", default=None, help="LLaVA-layout pre-training JSON (captions) instead of the demo's")
    real.add_argument("--instruct-data", default=None,
                      help="LLaVA-layout instruction JSON for phase 2 (default: the demo's questions)")
    real.add_argument("--image-folder", default=None, help="folder that --data / --instruct-data images live in")
    real.add_argument("--device", default=None, help="cpu, cuda, ... (default: what the Trainer picks)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: 1 with the built-in tiny models, else torch's default)")
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    if (args.data or args.instruct_data) and not args.image_folder:
        raise CommandError("--data / --instruct-data need --image-folder (the folder their `image` paths are in)")
    # a local path that is not there would otherwise fail later as a confusing "not a valid Hub repo id"
    check_model_sources(args, "--clip", "--vision-tower", "--language-model")
    from .demo.run import run_demo as _run

    _run(args)
    return 0


# ---------------------------------------------------------------------------------------------- other modules
# name -> (module, register function, help): subcommands that other modules of the package define
EXTERNAL = {
    "levels": ("alignment_levels", "add_levels_subparser", "CLIP-score pairs and bucket them into alignment levels"),
    "pretrain": ("recipes", "add_pretrain_subparser", "phase 1: pre-train projector and alignment embeddings"),
    "sft": ("recipes", "add_sft_subparser", "phase 2: instruction tuning (projector, gate, LLM) with TRL"),
    "convert": ("convert", "add_convert_subparser", "convert a checkpoint of the original AlignGPT code"),
}

def _external_register(name: str):
    """The module's `add_*_subparser`, or the reason it is not there."""
    module_name, register, _ = EXTERNAL[name]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.{module_name}":
            raise  # a dependency of an existing module is missing: that is a real error
        return None, error
    add = getattr(module, register, None)
    return add, None if add else f"{module_name}.py has no {register}()"


def _add_external(subparsers, name: str) -> None:
    add, reason = _external_register(name)
    if add is not None:
        add(subparsers)
        return
    help_text = EXTERNAL[name][2]
    parser = subparsers.add_parser(name, help=f"{help_text} (not available in this install)",
                                   description=f"{help_text}. Not available: {reason}.")
    parser.set_defaults(func=_unavailable(name, reason))


def _unavailable(name, reason):
    def run(args):
        raise CommandError(f"`aligngpt {name}` is not available in this install ({reason})")

    return run


# ---------------------------------------------------------------------------------------------- parser
def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    """A learning rate or a number of epochs: 0 (or less) is never what was meant."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _num_levels(value: str) -> int:
    """N alignment levels: the top one is the global alignment and the gate mixes the others, so at least 2."""
    number = _positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 alignment levels (the top level is the global alignment, the gate mixes the "
            f"others), got {value!r}"
        )
    return number


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="aligngpt",
        description="AlignGPT (adaptive alignment levels for multimodal LLMs) for Hugging Face transformers.\n\n"
        + __doc__.split("\n\n")[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"transformers-aligngpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>", title="subcommands")
    add_demo_subparser(subparsers)
    _add_external(subparsers, "levels")
    _add_external(subparsers, "pretrain")
    _add_external(subparsers, "sft")
    add_chat_subparser(subparsers)
    _add_external(subparsers, "convert")
    add_push_subparser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # bitsandbytes (imported with TRL) warns on every start that an optional CPU kernel package is missing
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    if unknown:  # reported by the subcommand, with its usage line, not by `aligngpt`
        subparser.error(f"unrecognized arguments: {' '.join(unknown)} (see `aligngpt {args.command} --help`)")
    try:
        status = args.func(args)
    except CommandError as error:
        subparser.error(str(error))  # prints usage and `aligngpt <cmd>: error: ...`, exits with status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
