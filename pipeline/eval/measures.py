"""What an evaluation measures of a model: held-out NLL and exact match (the selection's: `selection_measures`).

- `heldout_nll`: a model's mean NLL per response token over held-out clean conversations
  (token-weighted), through the engine's `Scorer` (length-sorted, right-padded micro-batches).
- `exact_match`: the share of held-out problems whose greedy generation states the right answer
  in the task's "So the answer is X." form, generated in left-padded batches, with room for the
  longest answer (`longest_answer_tokens`): a cut-off generation cannot be right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.chat import ChatRenderer, load_chat_template
from pipeline.data.conversation import RowError, normalise_messages
from pipeline.eval.ground_truth import read_jsonl
from pipeline.eval.worked_problems import extract_answer
from pipeline.runtime.checkpoints import load_model, load_tokenizer
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_manifest, read_shard, verify_shards
from pipeline.runtime.fingerprint import tokenizer_fingerprints
from pipeline.scoring.batching import length_sorted_batches
from pipeline.scoring.precision import MIXED_BFLOAT16, compute_precision, load_dtype, precision_name, to_mixed_precision
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.scoring.scorer import Scorer


# --- held-out NLL -------------------------------------------------------------------------


def chat_tokenizer(model_dir: Path | str, trust_remote_code: bool = False) -> Any:
    """The model folder's tokenizer with its chat template checked."""
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    load_chat_template(tokenizer, None, str(model_dir))
    return tokenizer


def _rows(heldout: Path | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = read_jsonl(Path(heldout)) if isinstance(heldout, (str, Path)) else list(heldout)
    if not rows:
        raise UserError(f"the held-out set {heldout if isinstance(heldout, (str, Path)) else ''} is empty")
    return rows


def _messages(row: dict[str, Any], index: int) -> list[dict[str, str]]:
    try:
        return normalise_messages(row)
    except RowError as error:
        raise UserError(f"held-out row {row.get('id', index)!r} is not a conversation: {error.detail}") from error


def _heldout_tokens(model_dir: Path | str, heldout: Path | Sequence[dict[str, Any]], trust_remote_code: bool
                    ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, input_ids, trainable) of the held-out conversations: a tokenized folder's, or rows rendered here."""
    if isinstance(heldout, (str, Path)) and Path(heldout).is_dir():
        manifest = read_manifest(Path(heldout), "tokenized")
        verify_shards(Path(heldout), manifest)
        own = tokenizer_fingerprints(chat_tokenizer(model_dir, trust_remote_code))["tokenizer"]
        if own != manifest["tokenizer"]["fingerprint"]:
            raise UserError(
                f"{heldout} was tokenized with another tokenizer than the one in {model_dir}; "
                "give the heldout.jsonl instead, or prepare it with this model's tokenizer"
            )
        ids, tokens, masks = [], [], []
        for entry in manifest["shards"]:
            shard = read_shard(Path(heldout) / entry["file"], "tokenized", columns=["sample_id", "input_ids", "trainable"])
            ids += shard.column("sample_id").to_pylist()
            tokens += [np.asarray(x, dtype=np.int64) for x in shard.column("input_ids").to_pylist()]
            masks += [np.asarray(x, dtype=bool) for x in shard.column("trainable").to_pylist()]
        return ids, tokens, masks
    renderer = ChatRenderer(chat_tokenizer(model_dir, trust_remote_code))
    rows = _rows(heldout)
    rendered = [renderer.render(_messages(row, index)) for index, row in enumerate(rows)]
    return ([str(row.get("id", index)) for index, row in enumerate(rows)],
            [np.asarray(r.input_ids, dtype=np.int64) for r in rendered], [np.asarray(r.trainable) for r in rendered])


def heldout_nll(model_dir: Path | str, heldout: Path | Sequence[dict[str, Any]],
                settings: ScoreSettings | None = None) -> float:
    """Mean NLL (nats) per response token of `model_dir` over held-out conversations, token-weighted.

    `heldout`: a heldout.jsonl (or its rows), rendered with the model folder's own tokenizer and
    chat template, or a tokenized folder made by `sstoken prepare` with that tokenizer.
    """
    settings = settings or ScoreSettings()
    ids, tokens, masks = _heldout_tokens(model_dir, heldout, settings.trust_remote_code)
    signals = Scorer(model_dir, settings, importance=False).token_signals(ids, tokens, masks)
    values = np.concatenate([s.nll[m] for s, m in zip(signals, masks)])
    if values.size == 0:
        raise UserError("the held-out conversations have no response token to score")
    return float(values.astype(np.float64).mean())


# --- exact match --------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One held-out problem's greedy answer: the generated text, the answer read from it, and the truth."""

    id: str
    text: str
    answer: str | None
    expected: str

    @property
    def correct(self) -> bool:
        return self.answer is not None and self.answer == " ".join(self.expected.split())


def _prompt_ids(tokenizer: Any, row: dict[str, Any], index: int) -> list[int]:
    """The conversation up to its last assistant turn, with the template's generation prompt."""
    messages = _messages(row, index)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def greedy_answers(model_dir: Path | str, heldout: Path | Sequence[dict[str, Any]], *, max_new_tokens: int = 96,
                   max_batch_tokens: int = 8192, threads: int | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False) -> list[Generation]:
    """Greedy generations for held-out rows (each with an `answer`), in row order.

    Prompts are batched by length and left-padded (generation appends at the right end; position
    ids follow the attention mask); each stops at the tokenizer's end-of-turn (EOS) token or after
    `max_new_tokens`. `max_batch_tokens` bounds prompt plus new tokens per batch. `dtype` is the
    scorer's setting: auto/float32, or bfloat16 (bf16 matmuls around a float32 residual stream).
    """
    rows = _rows(heldout)
    missing = [str(row.get("id", index)) for index, row in enumerate(rows) if not isinstance(row.get("answer"), str)]
    if missing:
        raise UserError(f"held-out row {missing[0]!r} has no 'answer' string to check a generation against")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    tokenizer = chat_tokenizer(model_dir, trust_remote_code)
    precision = precision_name(dtype)
    model = load_model(model_dir, load_dtype(precision), "cpu", trust_remote_code=trust_remote_code)
    if precision == MIXED_BFLOAT16:
        to_mixed_precision(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [_prompt_ids(tokenizer, row, index) for index, row in enumerate(rows)]
    texts: list[str] = [""] * len(rows)
    lengths = [len(p) + max_new_tokens for p in prompts]
    with torch.inference_mode(), compute_precision(precision, torch.device("cpu")):
        for batch in length_sorted_batches(lengths, max_batch_tokens):
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, width - len(prompts[index]):] = torch.tensor(prompts[index])
                attention_mask[row, width - len(prompts[index]):] = 1
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
            for row, index in enumerate(batch):
                texts[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
    return [Generation(str(row.get("id", index)), text, extract_answer(text), row["answer"])
            for index, (row, text) in enumerate(zip(rows, texts))]


def longest_answer_tokens(model_dir: Path | str, heldout: Path | Sequence[dict[str, Any]],
                          trust_remote_code: bool = False) -> int:
    """Tokens of the longest last assistant message of the held-out rows, in the model's tokenizer (what a
    generation must produce before the end-of-turn token; add a margin for the template's own tokens)."""
    tokenizer = chat_tokenizer(model_dir, trust_remote_code)
    longest = 0
    for index, row in enumerate(_rows(heldout)):
        answer = [m for m in _messages(row, index) if m["role"] == "assistant"][-1]["content"]
        longest = max(longest, len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return longest


def exact_match(model_dir: Path | str, heldout: Path | Sequence[dict[str, Any]], max_new_tokens: int = 96,
                **options: Any) -> float:
    """The share of held-out problems whose greedy answer equals the true one (see `greedy_answers`)."""
    generations = greedy_answers(model_dir, heldout, max_new_tokens=max_new_tokens, **options)
    return sum(g.correct for g in generations) / len(generations)
