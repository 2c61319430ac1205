"""Held-out POPE-style evaluation of a demo-trained AlignGPT through lmms-eval (`--model aligngpt`).

    aligngpt demo --output outputs/demo                      # trains and saves outputs/demo/checkpoint
    python examples/eval_demo_pope.py outputs/demo/checkpoint  # needs the eval extra: pip install -e ".[eval]"

Builds "Is there a <colour> <shape>?" questions on scenes whose layouts the demo never trains on
(`demo.scenes.build_yes_no_eval`: balanced yes/no, half of the "no" questions adversarial, i.e. sharing a colour or
a shape with something in the scene), writes them as a local lmms-eval task that reuses lmms-eval's own POPE
functions, runs `python -m lmms_eval --model aligngpt` in a subprocess and reports accuracy / precision / recall /
F1 against chance (50%: the set is balanced) with a 95% interval and a one-sided binomial p-value.

The demo's instruction data asks its questions without POPE's "Answer the question using a single word or phrase."
and answers "Yes." / "No.", so by default the task asks the questions as the demo was taught (`--pope-suffix` adds
POPE's suffix) and reads the first word of the answer (`YES_NO_FILTER`; lmms-eval's POPE scoring alone compares the
lower-cased answer exactly, so "yes." would count as wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from transformers_aligngpt.demo.scenes import DEMO_SEED, build_yes_no_eval
from transformers_aligngpt.evaluation.local_tasks import (
    SHORT_ANSWER_SUFFIX,
    pope_style_dataset,
    run_lmms_eval,
    write_pope_task,
)

TASK = "aligngpt_demo_pope"


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def binomial_p_above_chance(successes: int, total: int) -> float:
    """P(X >= successes) for X ~ Binomial(total, 0.5): how likely chance alone scores this well."""
    return sum(math.comb(total, k) for k in range(successes, total + 1)) / 2**total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder saved by `aligngpt demo` (OUTPUT/checkpoint)")
    parser.add_argument("--num-rows", type=int, default=200, help="held-out questions (default 200)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="scene seed (default: the demo's)")
    parser.add_argument("--image-size", type=int, default=48,
                        help="scene size in pixels: 48, as the demo (full and `--quick`) renders its scenes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pope-suffix", action="store_true",
                        help="append POPE's 'Answer the question using a single word or phrase.'")
    parser.add_argument("--model-args", default="", help="extra aligngpt model args, e.g. alignment_mode=global")
    parser.add_argument("--output", default=None, help="where tasks and lmms-eval logs go (default: next to the "
                        "checkpoint, lmms_eval_pope/)")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint).resolve()
    output = Path(args.output) if args.output else checkpoint.parent / "lmms_eval_pope"
    task_dir = output / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    held_out = build_yes_no_eval(args.num_rows, args.seed, args.image_size)
    write_pope_task(task_dir, pope_style_dataset(held_out), TASK, max_new_tokens=8, yes_no_filter=True,
                    post_prompt=SHORT_ANSWER_SUFFIX if args.pope_suffix else "")
    print(f"{args.num_rows} held-out yes/no questions (balanced) -> {task_dir}", flush=True)

    run = run_lmms_eval(checkpoint, [TASK], task_dir, output / "logs", batch_size=args.batch_size,
                        model_args=args.model_args)
    metrics = run["results"]["results"][TASK]
    samples = run["samples"][TASK]
    predictions = [s["pope_accuracy"]["prediction"] for s in samples]
    correct = sum(s["pope_accuracy"]["score"] for s in samples)
    total = len(samples)
    categories = held_out["category"]
    low, high = wilson_interval(int(correct), total)
    report = {
        "checkpoint": str(checkpoint),
        "questions": total,
        "accuracy": metrics["pope_accuracy,yes_no"],
        "precision": metrics["pope_precision,yes_no"],
        "recall": metrics["pope_recall,yes_no"],
        "f1": metrics["pope_f1_score,yes_no"],
        "predicted_yes_ratio": sum(p == "yes" for p in predictions) / total,
        "unparsed_answers": sum(p not in ("yes", "no") for p in predictions),
        "chance_accuracy": 0.5,
        "accuracy_95ci": [round(low, 4), round(high, 4)],
        "p_value_vs_chance": binomial_p_above_chance(int(correct), total),
        "accuracy_by_category": {
            category: sum(s["pope_accuracy"]["score"] for s in samples if categories[s["doc_id"]] == category)
            / sum(categories[s["doc_id"]] == category for s in samples)
            for category in sorted(set(categories))
        },
        "example_answers": [s["resps"][0] if s.get("resps") else s["filtered_resps"] for s in samples[:4]],
    }
    print(json.dumps(report, indent=1, default=str))
    print(f"accuracy {100 * report['accuracy']:.1f}% vs 50% chance ({100 * (report['accuracy'] - 0.5):+.1f} points, "
          f"95% CI {100 * low:.1f}-{100 * high:.1f}%, p = {report['p_value_vs_chance']:.2g}); F1 "
          f"{100 * report['f1']:.1f}")
    (output / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
