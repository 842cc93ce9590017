"""Calibration of the decisive eval: can an oracle selection beat training on every token by more than seed noise?

    python tests/benchmarks/calibrate_eval_task.py                        # the recommended settings, 3 seeds
    python tests/benchmarks/calibrate_eval_task.py --lr 1e-3 --corrupt-fraction 0.3 --out cal.json
    python tests/benchmarks/calibrate_eval_task.py --recipe '{"conversations": 64000}'   # another task model

Not collected by pytest. The base is the eval's tiny task model (`pipeline.eval.task_model`, built
once and cached; the build time is printed when it is built now). For each seed, the seed's
ground-truth task (`pipeline.eval.ground_truth.generate_task`: --train conversations, a
--corrupt-fraction share with one corrupted span each, in equal shares of the corruption kinds)
is rendered with the model's chat template, and the base is fine-tuned once per mask on the same
samples in the same order, with the same optimizer steps (one pass, --batch samples a step):
- full: every trainable token (the eval's steps-matched `full`);
- oracle: per sample, ceil(--ratio x trainable) tokens, corrupted ones dropped first, the rest of
  the drop random (the eval's `oracle` row);
- random: per sample, the same count, uniformly at random (`pipeline.selection.methods`' random).
Training uses the train stage's own pieces (`FineTuned`, `train_step`, `DataPlan`, the learning-rate
schedule), one continuous run: with the loop's optimizer continuity, 5 slice rounds of these
masks train exactly this. Each model is then measured as the eval measures it: held-out NLL per
response token (`heldout_nll`, float32) and exact match (`greedy_answers`, --max-new-tokens).

The power gate: per seed the paired difference oracle - full (NLL: full - oracle, so positive is
"oracle better"; exact match: oracle - full); the gate passes on a measure when the mean paired
difference exceeds 3x the standard deviation of the paired differences over seeds. The same for
oracle vs random. Times: one scoring pass over the training samples (current model, attention
importance, float32: what a slice round's score stage costs, summed over the slices), the
training of one cell, and the measuring of one model, give the per-cell estimate printed at the end.
Run with one torch thread (--threads 1) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.data.chat import ChatRenderer
from pipeline.eval.ground_truth import generate_task
from pipeline.eval.measures import chat_tokenizer, greedy_answers, heldout_nll
from pipeline.eval.task_model import DEFAULT_RECIPE, TaskModelRecipe, ensure_task_model, folder_name
from pipeline.runtime.model_zoo import cache_root
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.scoring.scorer import Scorer
from pipeline.selection.methods import sample_seed
from pipeline.selection.selection import keep_count, top_k_mask
from pipeline.training.finetune import FineTuned
from pipeline.training.train_settings import TrainSettings, learning_rate, warmup_steps
from pipeline.training.train_step import step_seed, train_step
from pipeline.training.train_worker import micro_batch
from pipeline.training.training_data import DataPlan

MASKS = ("full", "oracle", "random")


def commit() -> str:
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def rendered_task(model: Path, seed: int, args: argparse.Namespace):
    """The seed's task: training samples (ids, trainable, corrupted) and held-out rows."""
    task = generate_task(seed, args.train, args.heldout, corrupt_fraction=args.corrupt_fraction)
    renderer = ChatRenderer(chat_tokenizer(model))
    samples = []
    for row in task.train:
        spans = [(span["turn"], span["start"], span["end"]) for span in row["corruption"]]
        rendered, marked = renderer.render_marking(row["messages"], spans)
        samples.append((row["id"], np.asarray(rendered.input_ids, dtype=np.int64),
                        np.asarray(rendered.trainable, dtype=bool), np.asarray(marked, dtype=bool)))
    return task, samples


def keep_masks(samples, ratio: float, seed: int) -> dict[str, list[np.ndarray]]:
    """full, oracle and random keep masks of every sample (random draws as the random method does)."""
    masks: dict[str, list[np.ndarray]] = {name: [] for name in MASKS}
    for sample_id, _, trainable, corrupted in samples:
        k = keep_count(ratio, int(trainable.sum()))
        noise = np.zeros(len(trainable), dtype=np.float32)
        noise[trainable] = sample_seed(seed, sample_id).random(int(trainable.sum()), dtype=np.float32)
        masks["full"].append(trainable.copy())
        masks["random"].append(top_k_mask(noise, trainable, k))
        masks["oracle"].append(top_k_mask(noise + (~corrupted).astype(np.float32), trainable, k))
    return masks


def fine_tune(model: Path, samples, keep: list[np.ndarray], seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One pass of the train stage's step over the samples with these keep masks; the model saved to `out`."""
    settings = TrainSettings(lr=args.lr, batch_size=args.batch, micro_batch_size=args.batch, seed=seed,
                             finetune=args.finetune, warmup_ratio=args.warmup, max_grad_norm=args.max_grad_norm,
                             weight_decay=0.0, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0)
    rows = {i: (ids, mask) for i, ((_, ids, _, _), mask) in enumerate(zip(samples, keep))}
    lengths = np.asarray([len(ids) for _, ids, _, _ in samples], dtype=np.int64)
    plan = DataPlan(len(samples), settings.batch_size, settings.micro_batch_size, 1, seed, 1.0)
    warmup = warmup_steps(plan.steps, settings.warmup_ratio)
    started = time.monotonic()
    tuned = FineTuned(model, settings, torch.device("cpu"))
    optimizer = tuned.optimizer()
    losses, kept = [], 0
    for step in range(plan.steps):
        batches = [micro_batch(rows, positions) for positions in plan.micro_batches(step, 0, lengths)]
        torch.manual_seed(step_seed(seed, step))
        result = train_step(tuned.model, optimizer, batches, learning_rate(step, settings.lr, plan.steps, warmup),
                            settings.max_grad_norm)
        losses.append(result.loss)
        kept += result.kept_tokens
    tuned.save_pretrained(out, model)
    return {"steps": plan.steps, "kept_tokens": kept, "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])),
            "train_s": time.monotonic() - started}


def measure(model: Path, heldout: list[dict], args: argparse.Namespace) -> dict:
    started = time.monotonic()
    nll = heldout_nll(model, heldout, ScoreSettings(dtype="float32", threads=args.threads))
    generations = greedy_answers(model, heldout, max_new_tokens=args.max_new_tokens, dtype="float32",
                                 threads=args.threads)
    by_kind: dict[str, list[bool]] = {}
    for row, generation in zip(heldout, generations):
        by_kind.setdefault(row["source"], []).append(generation.correct)
    return {"nll": nll, "em": float(np.mean([g.correct for g in generations])),
            "em_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}, "measure_s": time.monotonic() - started}


def scoring_pass_seconds(model: Path, samples, args: argparse.Namespace) -> float:
    """One scoring pass over the training samples: NLL and attention importance, float32 (a round's current pass)."""
    scorer = Scorer(model, ScoreSettings(dtype="float32", threads=args.threads), importance=True)
    started = time.monotonic()
    scorer.token_signals([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples])
    return time.monotonic() - started


def gate(differences: list[float]) -> dict:
    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences) if len(differences) > 1 else math.nan
    return {"mean": mean, "spread": spread, "ratio": mean / spread if spread else math.inf,
            "passes": bool(len(differences) > 1 and mean > 3 * spread)}


def recipe_from(text: str | None) -> TaskModelRecipe:
    if not text:
        return DEFAULT_RECIPE
    given = json.loads(text)
    known = {f.name for f in fields(TaskModelRecipe)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise SystemExit(f"--recipe: unknown field(s) {unknown}; known: {sorted(known)}")
    if "pretrain_kinds" in given:
        given["pretrain_kinds"] = tuple(given["pretrain_kinds"])
    return replace(DEFAULT_RECIPE, **given)


def summarise(report: dict) -> None:
    """The table, the power gates and the per-cell times of one run's figures (or of several runs merged)."""
    seeds, masks = report["seeds"], [m for m in MASKS if all(m in f for f in report["seeds"].values())]
    print("\nseed  " + "  ".join(f"{m:>7s} NLL {m:>7s} EM" for m in masks))
    for seed, figures in seeds.items():
        print(f"{seed:>4}  " + "  ".join(f"{figures[m]['nll']:11.4f} {figures[m]['em']:10.3f}" for m in masks))
    gates = {}
    for other in ("full", "random"):
        if "oracle" not in masks or other not in masks:
            continue
        nll_diff = [figures[other]["nll"] - figures["oracle"]["nll"] for figures in seeds.values()]
        em_diff = [figures["oracle"]["em"] - figures[other]["em"] for figures in seeds.values()]
        gates[f"oracle_vs_{other}"] = {"nll": gate(nll_diff) | {"per_seed": nll_diff},
                                       "em": gate(em_diff) | {"per_seed": em_diff}}
        for measure_name, result in gates[f"oracle_vs_{other}"].items():
            print(f"oracle vs {other:6s} {measure_name:3s}: per seed {', '.join(f'{d:+.4f}' for d in result['per_seed'])}; "
                  f"mean {result['mean']:+.4f}, spread {result['spread']:.4f}, mean/spread {result['ratio']:.1f}: "
                  f"{'PASSES' if result['passes'] else 'fails'} the 3x gate")
    report["gates"] = gates
    train_s = statistics.fmean(f[m]["train_s"] for f in seeds.values() for m in masks)
    measure_s = statistics.fmean(f[m]["measure_s"] for f in seeds.values() for m in masks)
    score_s = next((f["score_pass_s"] for f in seeds.values() if "score_pass_s" in f), math.nan)
    report["per_cell_s"] = {"train": train_s, "measure": measure_s, "score_pass": score_s}
    print(f"per cell (1 thread): train {train_s:.0f} s, measure {measure_s:.0f} s, one scoring pass over the training "
          f"samples {score_s:.0f} s; a scoring method (score every slice, history cached) ~ {train_s + measure_s + score_s:.0f} s, "
          f"one with a history pass too ~ {train_s + measure_s + 2 * score_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=2000, help="Training conversations per seed.")
    parser.add_argument("--heldout", type=int, default=300, help="Held-out problems per seed.")
    parser.add_argument("--corrupt-fraction", type=float, default=0.3)
    parser.add_argument("--ratio", type=float, default=0.6, help="Kept share of trainable tokens (oracle, random).")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=0.03)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--finetune", choices=("full", "lora"), default="full")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--recipe", default=None, help="JSON object of TaskModelRecipe fields to change.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-score-timing", action="store_true", help="Skip timing a scoring pass.")
    parser.add_argument("--out", type=Path, default=None, help="Write every figure as JSON here.")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="Print the table and gates of these --out files (runs of other seeds, same settings) and stop.")
    args = parser.parse_args()
    if args.merge:
        reports = [json.loads(path.read_text()) for path in args.merge]
        merged = reports[0] | {"seeds": {seed: f for r in reports for seed, f in r["seeds"].items()}}
        print(f"merged {', '.join(map(str, args.merge))} (commits {sorted({r['commit'] for r in reports})})")
        summarise(merged)
        return 0
    torch.set_num_threads(args.threads)
    recipe = recipe_from(args.recipe)
    print(f"commit {commit()}  task model {folder_name(recipe)}  torch threads {args.threads}", flush=True)
    print("settings " + json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}), flush=True)

    started = time.monotonic()
    cached = (cache_root() / "models" / folder_name(recipe)).is_dir()
    model = ensure_task_model(recipe, progress=None)
    source = json.loads((model / "SOURCE.json").read_text())
    print(f"model {model} ({'cached' if cached else f'built in {time.monotonic() - started:.0f} s'}): "
          f"{source['parameters']:,} weights, vocab {source['vocabulary']}, pretrain {source['pretrain']}", flush=True)

    report = {"commit": commit(), "settings": vars(args) | {"out": str(args.out)}, "model": str(model),
              "recipe": recipe.as_dict(), "model_source": source, "seeds": {}}
    with tempfile.TemporaryDirectory(prefix="sstoken-calibrate-") as scratch:
        for seed in args.seeds:
            task, samples = rendered_task(model, seed, args)
            trainable = sum(int(s[2].sum()) for s in samples)
            corrupted = sum(int(s[3].sum()) for s in samples)
            answer_tokens = max(len(chat_tokenizer(model)(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
                                for row in task.heldout) + 1
            figures = {"trainable_tokens": trainable, "corrupted_tokens": corrupted,
                       "tokens": sum(len(s[1]) for s in samples), "longest_heldout_answer_tokens": answer_tokens,
                       "corrupted_by_kind": task.counts["corrupted_by_kind"]}
            if not args.no_score_timing and seed == args.seeds[0]:
                figures["score_pass_s"] = scoring_pass_seconds(model, samples, args)
            figures["base"] = measure(model, task.heldout, args)
            print(f"seed {seed}: {len(samples)} samples, {figures['tokens']} tokens, {trainable} trainable, "
                  f"{corrupted} corrupted ({corrupted / trainable:.1%}); longest held-out answer {answer_tokens} tokens; "
                  f"base NLL {figures['base']['nll']:.4f} EM {figures['base']['em']:.3f}", flush=True)
            masks = keep_masks(samples, args.ratio, seed)
            for name in args.masks:
                out = Path(scratch) / f"seed-{seed}-{name}"
                trained = fine_tune(model, samples, masks[name], seed, args, out)
                measured = measure(out, task.heldout, args)
                figures[name] = trained | measured
                print(f"  {name:7s} NLL {measured['nll']:.4f}  EM {measured['em']:.3f} {measured['em_by_kind']}  "
                      f"steps {trained['steps']} kept {trained['kept_tokens']} loss {trained['first_loss']:.3f}->"
                      f"{trained['last_loss']:.3f}  train {trained['train_s']:.0f} s measure {measured['measure_s']:.0f} s",
                      flush=True)
            report["seeds"][seed] = figures

    summarise(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
