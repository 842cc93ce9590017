"""Benchmark: the scoring engine against the naive reference on SmolLM2-135M-Instruct.

    python tests/benchmarks/bench_scorer.py            # about 10 minutes on 2 CPU cores
    python tests/benchmarks/bench_scorer.py --quick    # about two minutes: ours (defaults, warm) against plain HF
    python tests/benchmarks/bench_scorer.py --head-chunks    # the LM head alone, by logit chunk size

`--quick` is the guard against a silent CPU regression of the engine: run it before every stop that
touches pipeline/scoring and quote its ratio. It scores ~640-token chats with the current model alone
(history NLLs cached: the steady state of a round) at the default settings, against `hf-sdpa` (a plain
Hugging Face forward, SDPA, full float32 logits and log-softmax, one sample at a time) and against our
scorer with the 16,384-token CPU micro-batches it used before the budget became `auto` (`-b16384`) and
against our scorer with the 8 MiB LM-head chunks (2,097,152 logits, 42 rows) it used before fbd6653 (`-c2097152`).

Not collected by pytest (the name does not start with test_). Prints, per length:
- tokens/s of each variant, median over interleaved repeats, and the ratio to the naive reference;
- peak resident memory of each variant, each measured in a fresh subprocess (VmHWM);
- achieved FLOP/s of the fast path as a fraction of this machine's GEMM throughput in the same
  dtype, measured in this run;
- the ceiling of each float32 fast variant: its counted FLOPs run at the fastest GEMM rate measured in this run,
  as tokens/s and as a ratio to `hf-sdpa`: no scorer that does this exact float32 work runs faster on
  this machine (attention and elementwise work run below the GEMM rate, so the ceiling is generous);
- keep-mask agreement of bfloat16 with float32.

Variants: `hf-sdpa` (see --quick), `naive` (tests/pipeline/scoring/reference.py, the naive way the scoring issue defines: eager
attention, two model(..., output_attentions=True) calls with full logits, both outputs held, one
sample at a time, both models loaded once, outside the timing), `naive-lean` (the same numbers with
the history call asking for no attentions and each output dropped once used: a stronger baseline,
printed beside the first), `fast-<dtype>-cold` (what the
Ray job does when the history NLLs are not cached yet: phase 1 loads ONLY the history model and
computes its NLLs, releases it (del + gc), then phase 2 loads the current model and scores with
those NLLs; only one model is resident at a time), `fast-<dtype>-warm` (history NLLs from the
cache: the current model alone, loaded once outside the timing; the steady state with a fixed
history model). The history checkpoint is the current one with 5% Gaussian noise on every weight,
built once.

Model loads are timed apart from throughput for every variant: naive and warm load once before
timing; cold loads both models inside each run (as the job does once per job, a fixed cost that a
corpus amortises), and those load seconds are subtracted from its throughput and printed beside
it. Cold's peak memory is the larger of the two phases, not two models at once.

FLOP count of one fast-path forward over a sample of T tokens (what is counted as useful work):
    2 * P_body * T                          body matmuls (P_body: parameters minus embeddings and head)
  + layers * 4 * H * d_head * T(T+1)/2      attention scores and values, causal half only
  + 2 * D * V * n_targets                   LM head on target rows only
  + 4 * H * d_head * sum_i (i+1)            importance recompute, chosen layer, target queries (current only)
Elementwise work (norms, RoPE, activations, softmax) is not counted. In the bfloat16 (mixed) mode
the LM head runs in float32 but is counted against the bf16 GEMM rate, which understates that
mode's fraction a little.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from pipeline.scoring.precision import MIXED_BFLOAT16  # noqa: E402

transformers_logging.disable_progress_bar()  # the cold variant loads two models per run

PARAGRAPHS = [
    "The capital of France is Paris, a city on the Seine known for its museums, cafes and long history.",
    "To add two numbers in Python, define a function that takes a and b and returns their sum.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside plant leaves.",
    "A good summary keeps the main claim, the key evidence and the conclusion, and drops the rest.",
    "When training a language model, the loss is the average negative log-likelihood of the targets.",
    "The recipe needs two cups of flour, one egg, a pinch of salt and a little warm milk.",
    "Rivers carve valleys over millions of years, carrying sediment from mountains to the sea.",
    "In chess, controlling the centre early gives your pieces more room to move later in the game.",
]
QUESTIONS = ["Can you explain this?", "Tell me more.", "Why is that?", "Give an example, please.", "Summarise it."]


def history_checkpoint(current: Path) -> Path:
    """The current checkpoint plus 5% noise per weight, saved once as safetensors next to the model cache."""
    from transformers import AutoModelForCausalLM

    target = current.parent.parent / "bench" / (current.name + "-noised")
    if (target / "model.safetensors").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(current, dtype=torch.float32, local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.05)
    scratch = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
    model.save_pretrained(scratch, safe_serialization=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(scratch, target)
    return target


def make_samples(tokenizer, length: int, count: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """ChatML conversations of about `length` tokens (a few tokens shorter at random, so padding occurs)."""
    rng = np.random.default_rng(seed)
    ids_out, masks_out = [], []
    for _ in range(count):
        ids: list[int] = []
        mask: list[bool] = []
        target = length - int(rng.integers(0, 8))

        def add(role: str, text: str) -> None:
            head = tokenizer.encode(f"<|im_start|>{role}\n", add_special_tokens=False)
            body = tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)
            tail = tokenizer.encode("\n", add_special_tokens=False)
            ids.extend(head + body + tail)
            mask.extend([False] * len(head) + [role == "assistant"] * len(body) + [False] * len(tail))

        add("system", "You are a helpful assistant.")
        while len(ids) < target:
            add("user", " ".join(rng.choice(PARAGRAPHS, 2)) + " " + str(rng.choice(QUESTIONS)))
            add("assistant", " ".join(rng.choice(PARAGRAPHS, int(rng.integers(2, 6)))))
        ids_out.append(np.array(ids[:target], dtype=np.int64))
        masks_out.append(np.array(mask[:target], dtype=bool))
    return ids_out, masks_out


# -- variants -----------------------------------------------------------------------------------


class Naive:
    """The naive reference. `naive`: as the scoring issue defines it, two model(..., output_attentions=True)
    calls with full logits, both outputs held. `naive-lean`: the history call without attentions and
    each output dropped once used (same numbers; shown so the ratios can be read against both)."""

    def __init__(self, name: str, current: Path, history: Path):
        from tests.pipeline.scoring.reference import load_eager

        self.name, self.lean = name, name == "naive-lean"
        self.current, self.history = load_eager(current), load_eager(history)

    def run(self, ids, masks):
        from tests.pipeline.scoring.reference import naive_scores

        return [naive_scores(self.current, self.history, x, m, lean=self.lean) for x, m in zip(ids, masks)]


class PlainHF:
    """`hf-sdpa`: the plainest one-pass scorer, the current model only, SDPA, full float32 logits and
    log-softmax, one sample at a time (the NLLs it gives are the warm pass's, without importance)."""

    def __init__(self, current: Path):
        from transformers import AutoModelForCausalLM

        self.name = "hf-sdpa"
        self.model = AutoModelForCausalLM.from_pretrained(current, dtype=torch.float32, attn_implementation="sdpa").eval()

    def run(self, ids, masks):
        out = []
        with torch.inference_mode():
            for x, m in zip(ids, masks):
                ids_t = torch.as_tensor(x)[None]
                log_probs = torch.log_softmax(self.model(input_ids=ids_t).logits[0, :-1].float(), dim=-1)
                nll = -log_probs.gather(1, ids_t[0, 1:, None])[:, 0]
                out.append(nll.numpy()[m[1:]])
        return out


class Fast:
    def __init__(self, current: Path, history: Path, dtype: str, warm: bool, max_batch_tokens: int | str,
                 logit_chunk: int | None = None):
        from pipeline.scoring.score_settings import ScoreSettings
        from pipeline.selection.select_settings import SelectSettings

        self.name = f"fast-{dtype}-{'warm' if warm else 'cold'}" + (f"-b{max_batch_tokens}" if max_batch_tokens != "auto" else "")
        self.name += f"-c{logit_chunk}" if logit_chunk else ""
        self.logit_chunk = logit_chunk
        self.current, self.history = current, history
        self.settings = ScoreSettings(dtype=dtype, device="cpu", max_batch_tokens=max_batch_tokens)
        self.selection = SelectSettings()
        # warm: the current model, loaded once. cold: nothing until run() (the last run's phase-2
        # Scorer stays afterwards for the FLOP count, and is released when the next run starts).
        self.scorer = self.load(current, importance=True) if warm else None
        self.warm = warm
        self.load_seconds = 0.0  # model loads inside the last run (cold only): a per-job cost, timed apart
        self.cache: dict[int, list[np.ndarray]] = {}

    def load(self, checkpoint: Path, importance: bool):
        """A Scorer of `checkpoint` at this variant's settings, with its LM-head chunk when the name sets one."""
        import dataclasses

        from pipeline.scoring.scorer import Scorer

        scorer = Scorer(checkpoint, self.settings, importance=importance)
        if self.logit_chunk:
            scorer.budget = dataclasses.replace(scorer.budget, logit_chunk_elements=self.logit_chunk)
        return scorer

    def history_pass(self, ids, masks) -> list[np.ndarray]:
        """Phase 1: the history model alone computes its NLLs, then is released."""
        import gc

        started = time.perf_counter()
        scorer = self.load(self.history, importance=False)
        self.load_seconds += time.perf_counter() - started
        nlls = [s.nll for s in scorer.token_signals([str(i) for i in range(len(ids))], ids, masks)]
        del scorer
        gc.collect()
        return nlls

    def prepare(self, ids, masks):
        """Untimed: warm fills its history cache with the history pass (what the on-disk cache holds
        between rounds); cold runs once so both checkpoint files sit in the page cache."""
        if self.warm and id(ids) not in self.cache:
            self.cache[id(ids)] = self.history_pass(ids, masks)
        elif not self.warm:
            self.run(ids, masks)

    def run(self, ids, masks):
        from tests.sample_scores import score_samples

        sample_ids = [str(i) for i in range(len(ids))]
        if self.warm:
            return score_samples(self.scorer, sample_ids, ids, masks, self.selection, history_nll=self.cache[id(ids)])
        import gc

        self.scorer = None  # the previous run's current model goes before the history model loads
        gc.collect()
        self.load_seconds = 0.0
        history = self.history_pass(ids, masks)
        started = time.perf_counter()
        self.scorer = self.load(self.current, importance=True)  # phase 2: the current model only
        self.load_seconds += time.perf_counter() - started
        return score_samples(self.scorer, sample_ids, ids, masks, self.selection, history_nll=history)


def build_variant(name: str, current: Path, history: Path, max_batch_tokens: int | str):
    """A variant by name; `fast-DTYPE-MODE[-bN][-cM]` takes N tokens per CPU micro-batch (else `max_batch_tokens`)
    and M logits per LM-head chunk (else the device budget's)."""
    if name == "hf-sdpa":
        return PlainHF(current)
    if name.startswith("naive"):
        return Naive(name, current, history)
    _, dtype, mode, *sizes = name.split("-")
    size = {part[0]: int(part[1:]) for part in sizes}
    return Fast(current, history, dtype, mode == "warm", size.get("b", max_batch_tokens), size.get("c"))


# -- FLOPs and GEMM -----------------------------------------------------------------------------


def forward_flops(config, ids: list[np.ndarray], masks: list[np.ndarray], body_params: int, attention: bool) -> float:
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    total = 0.0
    for x, m in zip(ids, masks):
        t = len(x)
        targets = np.flatnonzero(m)
        total += 2 * body_params * t
        total += layers * 4 * heads * head_dim * t * (t + 1) / 2
        total += 2 * config.hidden_size * config.vocab_size * len(targets)
        if attention:
            total += 4 * heads * head_dim * float((targets + 1).sum())
    return total


def fast_flops(variant: Fast, ids, masks) -> float:
    model = variant.scorer.model
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    body = sum(p.numel() for p in model.parameters()) - embedding - (0 if tied else head.numel())
    flops = forward_flops(model.config, ids, masks, body, attention=variant.scorer.importance)
    if not variant.warm:
        flops += forward_flops(model.config, ids, masks, body, attention=False)
    return flops


def gemm_throughput(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of torch.mm on the model's MLP shapes (4096 tokens x 576 x 1536, both ways), this process.

    Measured again in every repeat, interleaved with the variants, because this machine is shared
    and its speed drifts; the report uses the median."""
    flops, elapsed = 0.0, 0.0
    for m, k, n in [(4096, 576, 1536), (4096, 1536, 576)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            torch.mm(a, b)
            count += 1
        elapsed += time.perf_counter() - start
        flops += 2 * m * k * n * count
    return flops / elapsed


# -- memory, in a child process -----------------------------------------------------------------


def child(arguments: argparse.Namespace) -> None:
    """Load one variant, score the samples once, print peak RSS in MiB as JSON."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    current, history = Path(arguments.model), Path(arguments.history)
    from pipeline.runtime.checkpoints import load_tokenizer

    ids, masks = make_samples(load_tokenizer(current), arguments.child_length, arguments.child_count, seed=1)
    variant = build_variant(arguments.child, current, history, arguments.max_batch_tokens)
    if isinstance(variant, Fast) and variant.warm:
        # The cached NLLs come from disk in real runs; here a cold pass would load the history
        # model and skew the peak, so use NaN-free placeholders of the right shape instead.
        variant.cache[id(ids)] = [np.where(m, 1.0, np.nan).astype(np.float32) for m in masks]
    with torch.inference_mode():
        variant.run(ids, masks)
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    exec, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(arguments, variant: str, length: int, count: int) -> float:
    command = [sys.executable, __file__, "--child", variant, "--child-length", str(length), "--child-count", str(count),
               "--model", str(arguments.model), "--history", str(arguments.history),
               "--max-batch-tokens", str(arguments.max_batch_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


# -- main ---------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit these figures are measured at (`+dirty` with uncommitted changes): README figures quote it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def head_chunks(model_path: Path, rows: int = 1758, repeats: int = 5) -> None:
    """The model's LM head with its cross-entropy over `rows` target rows, in float32 logit chunks of 8, 16, 30 and
    64 MiB: GFLOP/s of each, median of interleaved repeats, one process run."""
    from transformers import AutoModelForCausalLM

    from pipeline.scoring.nll import gathered_nll_entropy

    head = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True).get_output_embeddings()
    vocab, width = head.weight.shape
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, rows, width, generator=generator)
    predicting, labels = torch.arange(rows), torch.randint(0, vocab, (rows,), generator=generator)
    sizes = {mib: (mib << 20) // 4 for mib in (8, 16, 30, 64)}
    seconds: dict[int, list[float]] = {mib: [] for mib in sizes}
    with torch.inference_mode():
        for _ in range(repeats):
            for mib, elements in sizes.items():
                started = time.perf_counter()
                gathered_nll_entropy(hidden, predicting, labels, head, None, elements, entropy=False)
                seconds[mib].append(time.perf_counter() - started)
    print(f"LM head + cross-entropy, {rows} rows x {width} -> {vocab}, median of {repeats} interleaved repeats:")
    for mib, elements in sizes.items():
        rate = 2 * rows * width * vocab / statistics.median(seconds[mib])
        print(f"  {mib:3d} MiB chunks ({elements // vocab:4d} rows): {rate / 1e9:6.1f} GFLOP/s")


def keep_agreement(a, b, masks) -> float:
    same = sum(int((x.keep[m] == y.keep[m]).sum()) for x, y, m in zip(a, b, masks))
    return same / sum(int(m.sum()) for m in masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: pipeline.runtime.model_zoo smollm2-135m)")
    parser.add_argument("--history", type=Path, default=None, help="history folder (default: the model plus noise)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--tokens-per-length", type=int, default=2048, help="samples per length = this / length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-tokens", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="CPU micro-batch tokens of the fast variants (default: the setting's default, auto)")
    parser.add_argument("--variants", nargs="+",
                        default=["naive", "naive-lean", "fast-float32-cold", "fast-float32-warm", "fast-bfloat16-cold", "fast-bfloat16-warm"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant subprocess memory runs")
    parser.add_argument("--quick", action="store_true",
                        help="about two minutes: fast-float32-warm (defaults) against hf-sdpa, "
                             "fast-float32-warm-b16384 and fast-float32-warm-c2097152, ~640 tokens")
    parser.add_argument("--head-chunks", action="store_true",
                        help="only the LM head with its cross-entropy, in logit chunks of 8 to 64 MiB (GFLOP/s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-count", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.model is None:
        from pipeline.runtime.model_zoo import ensure_model

        arguments.model = ensure_model("smollm2-135m")
    if arguments.history is None:
        arguments.history = history_checkpoint(Path(arguments.model))
    if arguments.child:
        child(arguments)
        return
    if arguments.head_chunks:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        print(f"commit {code_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        head_chunks(Path(arguments.model))
        return
    if arguments.quick:
        arguments.lengths, arguments.repeats, arguments.tokens_per_length = [640], 3, 3200
        arguments.variants = ["hf-sdpa", "fast-float32-warm", "fast-float32-warm-b16384", "fast-float32-warm-c2097152"]
        arguments.no_memory = True

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"commit {code_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, model {arguments.model}")
    probed = ("float32", "bfloat16") if any("bfloat16" in v for v in arguments.variants) else ("float32",)
    gemm_samples: dict[str, list[float]] = {name: [] for name in probed}

    from pipeline.runtime.checkpoints import load_tokenizer

    tokenizer = load_tokenizer(arguments.model)
    variants = [build_variant(v, arguments.model, arguments.history, arguments.max_batch_tokens) for v in arguments.variants]
    history_nlls: dict[str, dict[int, list[np.ndarray]]] = {}
    for variant in variants:  # one untimed history pass serves every warm variant of a dtype
        if isinstance(variant, Fast):
            variant.cache = history_nlls.setdefault(variant.settings.dtype, {})
    for length in arguments.lengths:
        count = max(1, arguments.tokens_per_length // length)
        ids, masks = make_samples(tokenizer, length, count, seed=1)
        tokens = sum(len(x) for x in ids)
        for variant in variants:
            if isinstance(variant, Fast):
                variant.prepare(ids, masks)
        timings: dict[str, list[float]] = {v.name: [] for v in variants}
        load_timings: dict[str, list[float]] = {}
        outputs: dict[str, list] = {}
        for _ in range(arguments.repeats):  # interleaved: every variant (and the GEMM probe) once per repeat
            for name in gemm_samples:
                gemm_samples[name].append(gemm_throughput(getattr(torch, name)))
            for variant in variants:
                start = time.perf_counter()
                outputs[variant.name] = variant.run(ids, masks)
                loads = getattr(variant, "load_seconds", 0.0)
                timings[variant.name].append(time.perf_counter() - start - loads)
                load_timings.setdefault(variant.name, []).append(loads)
        print(f"\n== length ~{length}: {count} samples, {tokens} tokens, {int(sum(m.sum() for m in masks))} targets, "
              f"median of {arguments.repeats} interleaved repeats ==")
        gemm = {name: statistics.median(values) for name, values in gemm_samples.items()}
        print("GEMM throughput (median so far): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm.items()))
        naive_rate = tokens / statistics.median(timings["naive"]) if "naive" in timings else None
        lean_rate = tokens / statistics.median(timings["naive-lean"]) if "naive-lean" in timings else None
        plain_rate = tokens / statistics.median(timings["hf-sdpa"]) if "hf-sdpa" in timings else None
        memory = {}
        if not arguments.no_memory:
            memory = {v.name: peak_memory(arguments, v.name, length, count) for v in variants}
        for variant in variants:
            seconds = statistics.median(timings[variant.name])
            line = f"{variant.name:20s} {tokens / seconds:8.1f} tokens/s"
            if naive_rate:
                line += f"  x{tokens / seconds / naive_rate:5.2f} vs naive"
            if lean_rate:
                line += f" (x{tokens / seconds / lean_rate:5.2f} vs lean)"
            if plain_rate:
                line += f"  x{tokens / seconds / plain_rate:5.2f} vs hf-sdpa"
            if memory:
                line += f"  peak {memory[variant.name]:7.0f} MiB"
                if "naive" in memory:
                    line += f" ({memory[variant.name] / memory['naive']:.2f} of naive)"
            if isinstance(variant, Fast):
                dtype = "bfloat16" if variant.scorer.dtype_name == MIXED_BFLOAT16 else "float32"
                flops = fast_flops(variant, ids, masks)
                achieved = flops / seconds
                line += f"  {achieved / 1e9:6.1f} GFLOP/s = {achieved / gemm[dtype]:.0%} of {dtype} GEMM"
                if dtype == "float32":  # the mixed mode's LM head and importance run in float32: no one rate bounds it
                    ceiling = tokens * max(gemm_samples[dtype]) / flops
                    line += f"  ceiling {ceiling:.0f} tokens/s"
                    line += f" = x{ceiling / plain_rate:.2f} vs hf-sdpa" if plain_rate else ""
                loads = statistics.median(load_timings[variant.name])
                if loads:
                    line += f"  (+{loads:.1f} s model loads per run, excluded)"
            print(line)
        if "fast-float32-cold" in outputs and "fast-bfloat16-cold" in outputs:
            agreement = keep_agreement(outputs["fast-float32-cold"], outputs["fast-bfloat16-cold"], masks)
            rel_error = max(
                float(np.nanmax(np.abs(a.rel - b.rel)))
                for a, b in zip(outputs["fast-float32-cold"], outputs["fast-bfloat16-cold"])
            )
            print(f"bf16 vs fp32: same keep decision on {agreement:.2%} of targets; max |REL difference| {rel_error:.3f} nats")
        if "naive" in outputs and "fast-float32-cold" in outputs:
            worst = max(
                float(np.nanmax(np.abs(a.score - b["score"]))) for a, b in zip(outputs["fast-float32-cold"], outputs["naive"])
            )
            same = keep_agreement(outputs["fast-float32-cold"], [_as_scores(b) for b in outputs["naive"]], masks)
            print(f"fp32 fast vs naive: max |score difference| {worst:.2e}, same keep decision on {same:.2%} of targets")


def _as_scores(reference: dict):
    return argparse.Namespace(**reference)


if __name__ == "__main__":
    main()
