"""Benchmark: scoring (and one training step) at real model sizes, on any CUDA machine, with no download.

    python tests/benchmarks/bench_gpu.py                         # CUDA: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B shapes
    python tests/benchmarks/bench_gpu.py --shapes llama-3.2-1b --repeats 5
    python tests/benchmarks/bench_gpu.py --tiny --device cpu     # the whole script on a tiny shape, CPU, < 1 minute
    python tests/benchmarks/bench_gpu.py --device cpu --agreement-model DIR   # bf16 vs float32 on a real checkpoint

Not collected by pytest. Models are random-weight Llama shapes (configs written out below), built from
their configs, saved as bf16 safetensors and loaded back the way `sstoken score` loads a checkpoint.
Two checkpoints per shape (current, history: other seeds). Samples: `--tokens` random ids each, 4
turns, each turn 40% context then 60% trainable (the assistant part); no padding.

Variants, one process run, the same samples, tokens/s = tokens scored / seconds (median of --repeats
after one untimed warm-up run; model loading excluded):
- lean: Hugging Face with SDPA, bf16, both models resident, two forwards (current, history) with full
  logits, NLLs from a float32 log-softmax, batch 4. It computes no attention importance: a lower
  bound on what a plain script costs.
- naive: eager attention with `output_attentions=True` on the current forward (importance from the
  chosen layer's map), full logits, batch 1.
- ours cold: `Scorer` (dtype auto: bfloat16-full on CUDA) history pass, then the current pass with
  importance and the per-sample selection (`score_samples`), one model resident at a time.
- ours warm: the current pass with the history NLLs given (cached), and the same without importance
  (NLL only), which gives the importance recompute's share of a warm pass.
MFU = model FLOPs / seconds / the bf16 GEMM rate measured in this run (8192^3 matmuls on CUDA), with
model FLOPs = forwards x 2 x (all matmul parameters, LM head over every position included) per token
+ causal attention; the same numerator for every variant that runs the same forwards (cold, lean,
naive: 2; warm: 1), so MFU ratios are tokens/s ratios. Peak memory: torch.cuda.max_memory_allocated
over the variant's load and run (cold: loads one model, frees it, loads the other, as the score job).
Agreement: ours (bf16) against the same variant in float32, same models and samples: share of
targets with the same keep decision (ssToken, gamma 0.5, ratio 0.6, per sample), max |REL| and
|attention| difference. Training row (1B shape by default): our masked SFT step
(`pipeline.training.train_step.train_step`, float32 master weights, bf16 autocast, full fine-tune,
AdamW) on one batch of 8 x --tokens with 60% of the trainable tokens kept, against a plain Hugging
Face step (model(input_ids, labels).loss.backward(), AdamW) on the same batch; MFU counts 6N per token.
On CUDA the host syncs of one ours-warm micro-batch are counted with torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from pipeline.scoring.attention import turn_starts  # noqa: E402
from pipeline.scoring.score_settings import ScoreSettings  # noqa: E402
from pipeline.scoring.scorer import Scorer  # noqa: E402
from pipeline.selection.select_settings import SelectSettings  # noqa: E402
from tests.sample_scores import score_samples  # noqa: E402

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

# Published configs of the three shapes (only what sets the FLOPs and memory; RoPE scaling omitted).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
SELECTION = SelectSettings()  # ssToken: gamma 0.5, ratio 0.6, per sample
FULL = "bfloat16-full"


# -- models and data ------------------------------------------------------------------------------


def llama_config(shape: str, tokens: int) -> LlamaConfig:
    return LlamaConfig(rms_norm_eps=1e-5, max_position_embeddings=max(8192, tokens), bos_token_id=1, eos_token_id=2,
                       **SHAPES[shape])


def save_random_model(shape: str, tokens: int, seed: int, folder: Path, device: torch.device) -> Path:
    """A random-weight model of `shape` as bf16 safetensors (built on the device: seconds, not minutes, at 8B)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, tokens)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    release(device)
    return folder


def make_samples(count: int, tokens: int, vocab: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` samples of `tokens` random ids: 4 turns, each 40% context then 60% trainable."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    bounds = np.linspace(0, tokens, 5).astype(int)
    for _ in range(count):
        mask = np.zeros(tokens, dtype=bool)
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask[end - int(round(0.6 * (end - start))) : end] = True
        mask[0] = False
        ids.append(rng.integers(3, vocab, tokens).astype(np.int64))
        masks.append(mask)
    return ids, masks


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_hf(folder: Path, device: torch.device, attn: str, dtype: torch.dtype = torch.bfloat16):
    return LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(device).eval()


# -- FLOPs and the GEMM rate ----------------------------------------------------------------------


def forward_flops_per_token(config: LlamaConfig, tokens: int) -> float:
    """2 x matmul parameters (LM head included) + causal attention (QK^T and AV over T/2 keys on average)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * config.intermediate_size
    matmul_params = layers * per_layer + d * config.vocab_size
    attention = layers * 2 * 2 * q_dim * (tokens + 1) / 2
    return 2 * matmul_params + attention


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Best FLOP/s of a size^3 matmul in `dtype` on `device`."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        sync(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


# -- variants -------------------------------------------------------------------------------------


@dataclass
class Signals:
    nll_cur: list[np.ndarray]
    nll_hist: list[np.ndarray]
    attn: list[np.ndarray] | None


def full_logit_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """nll [B, T] from full logits, float32 log-softmax (entry 0: 0)."""
    logits = model(input_ids=input_ids).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(nll, (1, 0))


def lean_pass(models, ids, masks, device, batch: int = 4) -> Signals:
    current, history = models
    cur, hist = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            x = torch.as_tensor(np.stack(ids[start : start + batch]), device=device)
            cur.extend(full_logit_nll(current, x).cpu().numpy())
            hist.extend(full_logit_nll(history, x).cpu().numpy())
    return Signals(cur, hist, None)


def naive_pass(models, ids, masks, device, layer: int = -1) -> Signals:
    current, history = models
    cur, hist, attn = [], [], []
    with torch.inference_mode():
        for sample, mask in zip(ids, masks):
            x = torch.as_tensor(sample[None], device=device)
            out = current(input_ids=x, output_attentions=True)
            logits = out.logits[:, :-1].float()
            cur.append(torch.nn.functional.pad(-torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[0, :, 0], (1, 0)).cpu().numpy())
            # Mass of row i on keys before its turn: a cumulative sum over keys, read at turn_start - 1.
            cumulative = out.attentions[layer][0].float().cumsum(-1).mean(0)  # [T, T]
            starts = torch.as_tensor(np.maximum(turn_starts(mask), 1) - 1, device=device)
            rows = torch.arange(len(sample), device=device)
            attn.append(cumulative[rows, starts].cpu().numpy())
            del out
            hist.append(full_logit_nll(history, x)[0].cpu().numpy())
    return Signals(cur, hist, attn)


def ours_settings(device: torch.device, dtype: str) -> ScoreSettings:
    return ScoreSettings(device=device.type, dtype=dtype)


def ours_history(folder: Path, ids, masks, device, dtype: str) -> list[np.ndarray]:
    scorer = Scorer(folder, ours_settings(device, dtype), importance=False)
    with torch.inference_mode():
        out = [s.nll for s in scorer.token_signals([str(i) for i in range(len(ids))], ids, masks)]
    del scorer
    release(device)
    return out


def ours_current(scorer: Scorer, ids, masks, history: list[np.ndarray]):
    names = [str(i) for i in range(len(ids))]
    return score_samples(scorer, names, ids, masks, SELECTION, history_nll=history)


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of `repeats` runs after one untimed warm-up; also the last result."""
    result = run()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """Peak bytes allocated on a CUDA device inside the block (None on CPU)."""
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def host_syncs_per_micro_batch(scorer: Scorer, ids, masks, device: torch.device) -> int | None:
    """Host syncs CUDA reports in one micro-batch of ours (transformers' own included); None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            scorer.forward(ids[:2], masks[:2])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# -- agreement ------------------------------------------------------------------------------------


def keep_agreement(fast, exact, masks) -> dict[str, float]:
    """Share of targets with the same keep decision; max |REL| and |attention| differences; and what the
    flips cost, in float32 scores: `regret` = 1 - (float32 score mass of the tokens bf16 keeps) / (that of
    the tokens float32 keeps), `gap` = the largest float32 score distance of a flipped token from its
    sample's float32 threshold (the lowest kept score)."""
    same = total = 0
    rel_diff = attn_diff = gap = 0.0
    kept_by_fast = kept_by_exact = 0.0
    for f, e, m in zip(fast, exact, masks):
        same += int((f.keep[m] == e.keep[m]).sum())
        total += int(m.sum())
        rel_diff = max(rel_diff, float(np.nanmax(np.abs(f.rel[m] - e.rel[m]))))
        attn_diff = max(attn_diff, float(np.nanmax(np.abs(f.attn[m] - e.attn[m]))))
        kept_by_fast += float(e.score[f.keep].sum())
        kept_by_exact += float(e.score[e.keep].sum())
        flipped = m & (f.keep != e.keep)
        if flipped.any():
            gap = max(gap, float(np.abs(e.score[flipped] - e.score[e.keep].min()).max()))
    return {"keep": same / total, "rel": rel_diff, "attn": attn_diff, "targets": total,
            "regret": 1 - kept_by_fast / kept_by_exact, "gap": gap}


def agreement_run(current: Path, history: Path, ids, masks, device, dtypes=(FULL,)) -> dict[str, dict]:
    """Ours cold in float32 and in each of `dtypes`, compared target by target; `tok_s`: tokens per second
    of the two passes (model loading excluded, one run: a rough figure beside the agreement)."""
    names = [str(i) for i in range(len(ids))]

    def cold(dtype: str):
        seconds = 0.0
        history_scorer = Scorer(history, ours_settings(device, dtype), importance=False)
        with torch.inference_mode():
            started = time.perf_counter()
            hist = [s.nll for s in history_scorer.token_signals(names, ids, masks)]
            seconds += time.perf_counter() - started
        del history_scorer
        release(device)
        scorer = Scorer(current, ours_settings(device, dtype), importance=True)
        with torch.inference_mode():
            started = time.perf_counter()
            out = ours_current(scorer, ids, masks, hist)
            sync(device)
            seconds += time.perf_counter() - started
        del scorer
        release(device)
        return out, sum(len(x) for x in ids) / seconds

    exact, exact_rate = cold("float32")
    results = {"float32": {"tok_s": exact_rate}}
    for dtype in dtypes:
        scores, rate = cold(dtype)
        results[dtype] = keep_agreement(scores, exact, masks) | {"tok_s": rate}
    return results


# -- one shape ------------------------------------------------------------------------------------


def bench_shape(shape: str, args, device: torch.device, gemm: float, folder: Path) -> dict:
    config = llama_config(shape, args.tokens)
    current = save_random_model(shape, args.tokens, 0, folder / f"{shape}-current", device)
    history = save_random_model(shape, args.tokens, 1, folder / f"{shape}-history", device)
    ids, masks = make_samples(args.samples, args.tokens, config.vocab_size, seed=0)
    tokens = len(ids) * args.tokens
    flops = forward_flops_per_token(config, args.tokens)
    dtype = args.dtype
    row: dict = {"shape": shape, "tokens": tokens}

    def record(name: str, seconds: float, forwards: int, memory: dict):
        rate = tokens / seconds
        row[name] = {"tok_s": rate, "mfu": rate * forwards * flops / gemm, "peak": memory.get("peak")}

    for name, attn, run in (("lean", "sdpa", lean_pass), ("naive", "eager", naive_pass)):
        if name in args.skip:
            continue
        memory: dict = {}
        with peak_memory(device, memory):
            models = (load_hf(current, device, attn), load_hf(history, device, attn))
            n = len(ids) if name == "lean" else max(1, len(ids) // 4)  # naive is slow: a quarter of the samples
            seconds, _ = median_seconds(lambda: run(models, ids[:n], masks[:n], device), args.repeats, device)
        del models
        record(name, seconds * len(ids) / n, 2, memory)

    memory = {}
    with peak_memory(device, memory):  # the score job's way: one model resident at a time
        cached = ours_history(history, ids, masks, device, dtype)
        scorer = Scorer(current, ours_settings(device, dtype), importance=True)
        with torch.inference_mode():
            ours_current(scorer, ids, masks, cached)
        row["precision"], row["batch_tokens"] = scorer.dtype_name, scorer.budget.batch_tokens
        del scorer
    history_scorer = Scorer(history, ours_settings(device, dtype), importance=False)
    current_scorer = Scorer(current, ours_settings(device, dtype), importance=True)
    names = [str(i) for i in range(len(ids))]

    def cold():
        with torch.inference_mode():
            hist = [s.nll for s in history_scorer.token_signals(names, ids, masks)]
            return ours_current(current_scorer, ids, masks, hist)

    seconds, _ = median_seconds(cold, args.repeats, device)
    record("cold", seconds, 2, memory)
    del history_scorer
    release(device)
    warm_memory: dict = {}
    with peak_memory(device, warm_memory):
        with torch.inference_mode():
            seconds, _ = median_seconds(lambda: ours_current(current_scorer, ids, masks, cached), args.repeats, device)
    record("warm", seconds, 1, warm_memory)
    nll_only = Scorer(current, ours_settings(device, dtype), importance=False)
    with torch.inference_mode():
        plain, _ = median_seconds(lambda: nll_only.token_signals(names, ids, masks), args.repeats, device)
    row["importance_share"] = 1 - plain / seconds
    row["syncs"] = host_syncs_per_micro_batch(current_scorer, ids, masks, device)
    del nll_only, current_scorer
    release(device)

    n = min(len(ids), args.agreement_samples)
    row["agreement"] = agreement_run(current, history, ids[:n], masks[:n], device)[FULL]
    if shape == args.train_shape:
        row["train"] = bench_train(current, config, args, device, gemm)
    release(device)
    return row


# -- the training row -----------------------------------------------------------------------------


def bench_train(folder: Path, config: LlamaConfig, args, device: torch.device, gemm: float) -> dict:
    from pipeline.training.masked_loss import masked_labels
    from pipeline.training.train_step import MicroBatch, autocast_precision, train_step

    ids, masks = make_samples(args.train_batch, args.tokens, config.vocab_size, seed=1)
    rng = np.random.default_rng(2)
    keep = [m & (rng.random(len(m)) < 0.6) for m in masks]
    input_ids = torch.as_tensor(np.stack(ids))
    labels = masked_labels(input_ids, torch.as_tensor(np.stack(keep)))
    batch = MicroBatch(input_ids, torch.ones_like(input_ids), labels).to(device)
    tokens = input_ids.numel()
    out: dict = {"tokens": tokens}

    for name in ("hf", "ours"):
        memory: dict = {}
        with peak_memory(device, memory):
            model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").to(device)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
            params = sum(p.numel() for p in model.parameters())

            def hf_step():
                optimizer.zero_grad(set_to_none=True)
                with autocast_precision("auto" if device.type == "cuda" else "float32", device):
                    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            def our_step():
                train_step(model, optimizer, [batch], lr=1e-5, max_grad_norm=1.0,
                           precision=autocast_precision("auto" if device.type == "cuda" else "float32", device))

            seconds, _ = median_seconds(hf_step if name == "hf" else our_step, args.repeats, device)
        del model, optimizer
        release(device)
        rate = tokens / seconds
        out[name] = {"tok_s": rate, "mfu": rate * 6 * params / gemm, "peak": memory.get("peak")}
    return out


# -- output ---------------------------------------------------------------------------------------


def gib(value) -> str:
    return "–" if value is None else f"{value / 2**30:.1f} GiB"


def rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def markdown(rows: list[dict], machine: str, gemm: float, command: str) -> str:
    lines = [
        f"`{command}` on {machine}; bf16 GEMM {gemm / 1e12:.1f} TFLOP/s measured in this run.",
        "",
        "| shape | lean tok/s (MFU, peak) | naive | ours cold (× lean, MFU, peak) | ours warm (× lean, MFU, peak) "
        "| importance share of warm | keep agreement vs fp32 (max abs REL diff, score regret) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lean = row.get("lean")

        def versus(name: str) -> str:
            v = row[name]
            ratio = f"{v['tok_s'] / lean['tok_s']:.2f}× lean, " if lean else ""
            return f"{rate(v['tok_s'])} ({ratio}{v['mfu']:.0%}, {gib(v['peak'])})"

        cells = [
            row["shape"],
            f"{rate(lean['tok_s'])} ({lean['mfu']:.0%}, {gib(lean['peak'])})" if lean else "skipped",
            f"{rate(row['naive']['tok_s'])} ({row['naive']['mfu']:.0%}, {gib(row['naive']['peak'])})" if "naive" in row else "skipped",
            versus("cold"),
            versus("warm"),
            f"{row['importance_share']:.0%}",
            f"{row['agreement']['keep']:.2%} ({row['agreement']['rel']:.3f}, {row['agreement']['regret']:.1e})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ours: precision " + ", ".join(f"{r['shape']} {r['precision']}, {r['batch_tokens']} tokens/micro-batch"
                                              + (f", {r['syncs']} host syncs in one micro-batch" if r["syncs"] is not None else "")
                                              for r in rows) + ".")
    for row in rows:
        if "train" in row:
            t = row["train"]
            lines += [
                "",
                f"| training step, {row['shape']}, batch {args_train_batch(t)} | tok/s | MFU (6N) | peak |",
                "|---|---|---|---|",
                f"| plain Hugging Face step | {rate(t['hf']['tok_s'])} | {t['hf']['mfu']:.0%} | {gib(t['hf']['peak'])} |",
                f"| ours (masked, `train_step`) | {rate(t['ours']['tok_s'])} ({t['ours']['tok_s'] / t['hf']['tok_s']:.2f}×) "
                f"| {t['ours']['mfu']:.0%} | {gib(t['ours']['peak'])} |",
            ]
    return "\n".join(lines)


def args_train_batch(train: dict) -> str:
    return f"{train['batch']} x {train['length']}" if "batch" in train else f"{train['tokens']} tokens"


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=32, help="samples per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement-samples", type=int, default=8)
    parser.add_argument("--train-shape", default="llama-3.2-1b", help="shape of the training row ('none' to skip)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["lean", "naive"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", FULL], help="ours' precision")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, 256 tokens, 4 samples: tests the script")
    parser.add_argument("--agreement-model", type=Path, help="only: bf16 vs float32 agreement on this real checkpoint")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    command = "python tests/benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])
    if args.agreement_model is not None:
        print(real_model_agreement(args, device, command))
        return
    if args.tiny:
        args.shapes, args.tokens, args.samples, args.agreement_samples = ["tiny"], 256, 4, 4
        args.train_batch, args.repeats = 2, min(args.repeats, 2)
        args.train_shape = "tiny" if args.train_shape != "none" else "none"
    gemm = gemm_rate(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        for shape in args.shapes:
            started = time.perf_counter()
            rows.append(bench_shape(shape, args, device, gemm, Path(scratch)))
            print(f"{shape}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            for name in ("current", "history"):  # free the disk before the next shape (16 GB each at 8B)
                for file in (Path(scratch) / f"{shape}-{name}").glob("*"):
                    file.unlink()
    for row in rows:
        if "train" in row:
            row["train"].update(batch=args.train_batch, length=args.tokens)
    table = markdown(rows, machine_name(device), gemm, command)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


# -- bf16 vs float32 on a real checkpoint ---------------------------------------------------------


def real_model_agreement(args, device: torch.device, command: str) -> str:
    """ours cold in float32, bfloat16 (mixed) and bfloat16-full on a real checkpoint and its 5%-noised
    history (tests/benchmarks/bench_scorer.py builds it), on ChatML conversations of its tokenizer."""
    from pipeline.runtime.checkpoints import load_tokenizer
    from tests.benchmarks.bench_scorer import history_checkpoint
    from tests.benchmarks.bench_scorer import make_samples as chat_samples

    history = history_checkpoint(args.agreement_model)
    ids, masks = chat_samples(load_tokenizer(args.agreement_model), args.tokens, args.agreement_samples, seed=0)
    started = time.perf_counter()
    results = agreement_run(args.agreement_model, history, ids, masks, device, dtypes=("bfloat16", FULL))
    lines = [
        f"`{command}` on {machine_name(device)}: {len(ids)} conversations of ~{args.tokens} tokens, "
        f"{results[FULL]['targets']} targets, {time.perf_counter() - started:.0f} s.",
        "",
        "| precision vs float32 | same keep decision | max abs REL diff (nats) | max abs attention diff "
        "| score regret | largest flipped-token gap | cold tok/s (float32: "
        f"{results['float32']['tok_s']:.0f}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, label in (("bfloat16", "bfloat16 (mixed)"), (FULL, "bfloat16-full (auto on CUDA)")):
        r = results[dtype]
        lines.append(f"| {label} | {r['keep']:.2%} | {r['rel']:.3f} | {r['attn']:.4f} | {r['regret']:.2e} | {r['gap']:.4f} | {r['tok_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
