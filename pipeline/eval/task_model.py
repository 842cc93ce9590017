"""The eval's CPU model: a tiny Llama with a small synthetic vocabulary, pretrained here on clean skills.

    ensure_task_model() -> Path          # built once, then a cache hit: MODELS/task-llama-<fingerprint>
    model_zoo.ensure_model("task-llama")  # the same folder, so an eval config says `model: task-llama`

Why it exists: on a real small model (SmolLM2-135M) a 2-core machine can fine-tune a few dozen
samples, far too few for an oracle selection to beat training on everything by more than the seed
noise. A model of about a million weights trains two thousand samples in seconds, but from random
weights it would spend the whole fine-tune learning the chat format. So it is first pretrained on
a clean *skill* family that shares the task's format and sub-skills but none of its problems:

    sum / difference / product   "What is 37 + 8?"            "37 + 8 = 45. So the answer is 45."
    unit_fact                    "How many minutes are in one hour?"  "One hour is 60 minutes. So ..."
    smallest / largest           "Which is the smallest of 41, 7, 90?" "The smallest is 7. So ..."

The fine-tuning task (`pipeline.eval.ground_truth`: arithmetic with precedence, unit conversions in
one or two steps, sorting by repeated picks) is new to it: new phrasings, new multi-step worked
answers ("First, ... Then, ..."), composed from skills it has. Every skill answer ends with the
task's "So the answer is X." and every turn with the end-of-turn token, and each needs numbers read
from the prompt, so the pretrained model knows the format and attends to its prompt.

The tokenizer (`task_tokenizer`) is a `PreTrainedTokenizerFast` over whole words (each with and
without its leading space), single digits and single characters: the pre-tokenizer cuts text into
` ?word`, ` ?digit`, ` ?punctuation` and whitespace pieces, and a WordPiece model with an empty
continuation prefix spells any word it does not know (the random-token corruption) character by
character, so nothing is unknown and decoding is concatenation. The chat template is
`<|user|>...<|end|><|assistant|>...<|end|>`; `<|end|>` is EOS and a training target, as
`pipeline.data.chat` marks it.

The build is deterministic on one machine (seeded data, initialisation and steps; the project's own
train step, learning-rate schedule and data plan from `pipeline.training`), and its folder is keyed
by the fingerprint of its recipe (`TaskModelRecipe`) and `TASK_MODEL_VERSION`, built in a temporary
folder and renamed into place (`model_zoo.build_once`), with SOURCE.json saying how it was made.
Bump TASK_MODEL_VERSION when a change to this builder or to the problem generators changes what
it builds.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.worked_problems import ANSWER_SENTENCE, MAKERS, UNITS, Problem, render
from pipeline.runtime.fingerprint import sha256_json

TASK_MODEL_VERSION = 2
NAME = "task-llama"

USER, ASSISTANT, SYSTEM, END, PAD, UNK = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, UNK, END, USER, ASSISTANT, SYSTEM)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles are system, user and assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
# Pieces the pre-tokenizer cuts: a word, a digit or a punctuation mark (each with the space before
# it, if any), or one whitespace character. Every character of any text is in exactly one piece.
PIECES = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\s"


# --- the skills the model is pretrained on ------------------------------------------------


def _number(rng: random.Random) -> int:
    """A number of one, two or three digits (the task's numbers are mostly two or three digits)."""
    digits = rng.choices((1, 2, 3), weights=(1, 3, 2))[0]
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _one_step(kind: str, prompt: str, givens: dict[str, int], derive: Callable[[dict[str, int]], int],
              working: str) -> Problem:
    return Problem(kind, prompt, givens, (("r", derive),), (working, ANSWER_SENTENCE.format(answer="{r}")))


def sum_skill(rng: random.Random) -> Problem:
    a, b = _number(rng), _number(rng)
    prompt = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Find the sum of {a} and {b}.")).format(a=a, b=b)
    return _one_step("sum", prompt, {"a": a, "b": b}, lambda v: v["a"] + v["b"], "{a} + {b} = {r}.")


def difference_skill(rng: random.Random) -> Problem:
    a, b = sorted((_number(rng), _number(rng)), reverse=True)
    prompt = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.")).format(a=a, b=b)
    return _one_step("difference", prompt, {"a": a, "b": b}, lambda v: v["a"] - v["b"], "{a} - {b} = {r}.")


_FACTORS = sorted({factor for *_, factor in UNITS})


def product_skill(rng: random.Random) -> Problem:
    """Times tables, a number times a unit factor, and a two- or three-digit number times a small one."""
    form = rng.randrange(3)
    if form == 0:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    elif form == 1:
        a, b = rng.randint(2, 300), rng.choice(_FACTORS)
    else:
        a, b = rng.randint(10, 150), rng.randint(2, 12)
    prompt = rng.choice(("What is {a} * {b}?", "Multiply {a} by {b}.")).format(a=a, b=b)
    return _one_step("product", prompt, {"a": a, "b": b}, lambda v: v["a"] * v["b"], "{a} * {b} = {r}.")


def unit_fact_skill(rng: random.Random) -> Problem:
    _, singular, smaller, factor = rng.choice(UNITS)
    prompt = rng.choice(("How many {into} are in one {one}?", "One {one} is how many {into}?")).format(
        into=smaller, one=singular)
    return _one_step("unit_fact", prompt, {"k": factor}, lambda v: v["k"], f"One {singular} is {{r}} {smaller}.")


def _pick(kind: str, choose: Callable[[list[int]], int]) -> Callable[[random.Random], Problem]:
    def make(rng: random.Random) -> Problem:
        numbers = rng.sample(range(1, 100), rng.randint(3, 6))
        listed = ", ".join(map(str, numbers))
        prompt = rng.choice((f"Which is the {kind} of {listed}?", f"Find the {kind} number: {listed}."))
        return _one_step(kind, prompt, {}, lambda v, x=choose(numbers): x, f"The {kind} is {{r}}.")

    return make


# The task's own kinds in other words: the same computations and worked steps, other prompts and
# sentences (only "So the answer is X." is shared). Pretrained on these, the model knows how to work
# the problems; the fine-tune teaches the task's wording, which it learns in a few steps, so what a
# selection keeps out of the rest of the pass (the corrupted spans) decides how the model ends.
_REWORDINGS = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"^(?:What is|Compute|Calculate) (.*)[?.]$", r"Work out \1."),
    (r"^First, ", "Step 1: "),
    (r"^Then, ", "Step 2: "),
    (r"^Convert (.*) to (\w+)\.$", r"Express \1 in \2."),
    (r"^How many (\w+) are in (.*)\?$", r"Express \2 in \1."),
    (r"^One (\w+) is (\{\w+\}) (\w+), so (\{\w+\}) (\w+) is \4 \* \2 = (\{\w+\}) \3\.$",
     r"A \1 has \2 \3, and \4 * \2 = \6, so \4 \5 make \6 \3."),
    (r"^(?:Sort these numbers from smallest to largest|Put these numbers in increasing order): (.*)$",
     r"Arrange in ascending order: \1"),
    (r"^The smallest is ", "Lowest first: "),
    (r"^Next is ", "After that: "),
))


def reword(text: str) -> str:
    for pattern, replacement in _REWORDINGS:
        text = pattern.sub(replacement, text)
    return text


def _reworded(make: Callable[[random.Random], Problem]) -> Callable[[random.Random], Problem]:
    def make_reworded(rng: random.Random) -> Problem:
        problem = make(rng)
        return Problem(problem.kind, reword(problem.prompt), problem.givens, problem.steps,
                       tuple(reword(sentence) for sentence in problem.sentences))

    return make_reworded


SKILLS: dict[str, Callable[[random.Random], Problem]] = {
    "sum": sum_skill,
    "difference": difference_skill,
    "product": product_skill,
    "unit_fact": unit_fact_skill,
    "smallest": _pick("smallest", min),
    "largest": _pick("largest", max),
}
REWORDED: dict[str, Callable[[random.Random], Problem]] = {f"reworded_{kind}": _reworded(make) for kind, make in MAKERS.items()}
# What a recipe may pretrain on: the skills, the task's kinds reworded, and (for experiments) the task's own kinds.
PRETRAIN_MAKERS: dict[str, Callable[[random.Random], Problem]] = {**SKILLS, **REWORDED, **MAKERS}


# --- the recipe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskModelRecipe:
    """Everything that decides the built weights: the model's shape, the pretraining data and its training."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 512
    pretrain_kinds: tuple[str, ...] = ("sum", "product", "smallest", *REWORDED)
    conversations: int = 19_200  # pretraining conversations (one pass)
    two_turn_fraction: float = 0.25
    batch_size: int = 32
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.pretrain_kinds if kind not in PRETRAIN_MAKERS]
        if unknown or not self.pretrain_kinds:
            raise ValueError(f"pretrain_kinds {list(self.pretrain_kinds)}: choose from {', '.join(PRETRAIN_MAKERS)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pretrain_kinds": list(self.pretrain_kinds)}

    def fingerprint(self) -> str:
        return sha256_json({"version": TASK_MODEL_VERSION, "recipe": self.as_dict()})


DEFAULT_RECIPE = TaskModelRecipe()


def folder_name(recipe: TaskModelRecipe | None = None) -> str:
    """The cache folder of a recipe's model (model_zoo's builder protocol)."""
    return f"{NAME}-{(recipe or DEFAULT_RECIPE).fingerprint()[:16]}"


# --- the tokenizer ------------------------------------------------------------------------


def vocabulary_words() -> list[str]:
    """The words the task and the skills write (prompts, worked answers, filler), sorted.

    Drawn from a fixed seed, many problems of every kind, so every template word and unit name is in.
    """
    from pipeline.eval.ground_truth import FILLER_SENTENCES

    rng = random.Random("sstoken-task-model:vocabulary")
    texts = list(FILLER_SENTENCES) + [" ".join(unit[:3]) for unit in UNITS]
    for make in PRETRAIN_MAKERS.values():
        for _ in range(300):
            problem = make(rng)
            texts += [problem.prompt, render(problem).text]
    return sorted({word for text in texts for word in re.findall(r"[A-Za-z]+", text) if len(word) > 1})


def vocabulary() -> dict[str, int]:
    """token -> id: the special tokens, every printable character and word, each also with a leading space."""
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [*characters, *vocabulary_words()]
    tokens = [*SPECIAL_TOKENS, " ", "\n", "\t", *pieces, *(" " + piece for piece in pieces)]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def task_tokenizer() -> Any:
    """The `PreTrainedTokenizerFast` of the task model: chat template, EOS `<|end|>`, pad `<|pad|>`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(vocabulary(), unk_token=UNK, continuing_subword_prefix="",
                                         max_input_chars_per_word=100))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=DEFAULT_RECIPE.max_positions,
    )


def render_text(messages: list[dict[str, str]]) -> str:
    """What CHAT_TEMPLATE renders for `messages` (no generation prompt), without Jinja: the pretraining data's fast path."""
    return "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)


def trainable_flags(input_ids: list[int], tokenizer: Any) -> list[bool]:
    """Each assistant turn's tokens and its `<|end|>`, from the rendering's own markers (as `pipeline.data.chat` marks them)."""
    assistant, end = tokenizer.convert_tokens_to_ids([ASSISTANT, END])
    flags, inside = [], False
    for token in input_ids:
        flags.append(inside)
        if token == assistant:
            inside = True
        elif token == end:
            inside = False
    return flags


def model_config(recipe: TaskModelRecipe, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


# --- pretraining --------------------------------------------------------------------------


def pretraining_conversations(recipe: TaskModelRecipe, count: int | None = None, purpose: str = "pretrain"
                              ) -> list[list[dict[str, str]]]:
    """Clean conversations of the recipe's kinds, one or two exchanges each, from (seed, purpose) alone."""
    rng = random.Random(f"sstoken-task-model:{recipe.seed}:{purpose}")
    conversations = []
    for _ in range(recipe.conversations if count is None else count):
        messages = []
        for _ in range(2 if rng.random() < recipe.two_turn_fraction else 1):
            problem = PRETRAIN_MAKERS[rng.choice(recipe.pretrain_kinds)](rng)
            messages += [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": render(problem).text}]
        conversations.append(messages)
    return conversations


def tokenized_samples(conversations: list[list[dict[str, str]]], tokenizer: Any) -> list[tuple[Any, Any]]:
    """(input_ids, trainable) arrays per conversation, encoded in one batch call."""
    import numpy as np

    encoded = tokenizer([render_text(m) for m in conversations], add_special_tokens=False)["input_ids"]
    return [(np.asarray(ids, dtype=np.int64), np.asarray(trainable_flags(ids, tokenizer), dtype=bool)) for ids in encoded]


@dataclass
class PretrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    kept_tokens: int = 0


def pretrain(model: Any, samples: list[tuple[Any, Any]], recipe: TaskModelRecipe,
             progress: Callable[[int, int, float], None] | None = None) -> PretrainResult:
    """One pass over `samples`, loss on the trainable tokens, with the train stage's step, plan and schedule."""
    import numpy as np
    import torch

    from pipeline.training.train_settings import learning_rate, warmup_steps
    from pipeline.training.train_step import step_seed, train_step
    from pipeline.training.train_worker import micro_batch
    from pipeline.training.training_data import DataPlan

    plan = DataPlan(len(samples), recipe.batch_size, recipe.batch_size, 1, recipe.seed, 1.0)
    total, warmup = plan.steps, warmup_steps(plan.steps, recipe.warmup_ratio)
    lengths = np.asarray([len(ids) for ids, _ in samples], dtype=np.int64)
    rows = dict(enumerate(samples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    result, started = PretrainResult(total), time.monotonic()
    model.train()
    for step in range(total):
        batches = [micro_batch(rows, positions) for positions in plan.micro_batches(step, 0, lengths)]
        torch.manual_seed(step_seed(recipe.seed, step))
        outcome = train_step(model, optimizer, batches, learning_rate(step, recipe.lr, total, warmup), recipe.max_grad_norm)
        result.losses.append(outcome.loss)
        result.kept_tokens += outcome.kept_tokens
        if progress is not None:
            progress(step + 1, total, outcome.loss)
    result.seconds = time.monotonic() - started
    return result


def mean_nll(model: Any, samples: list[tuple[Any, Any]], batch: int = 64) -> float:
    """Mean NLL per trainable token (the loss the pretraining minimises) over `samples`."""
    import torch

    from pipeline.training.masked_loss import masked_nll_sum
    from pipeline.training.train_worker import micro_batch

    rows = dict(enumerate(samples))
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(samples), batch):
            micro = micro_batch(rows, list(range(start, min(start + batch, len(samples)))))
            nll, n = masked_nll_sum(model, micro.input_ids, micro.attention_mask, micro.labels)
            total, count = total + float(nll), count + n
    return total / max(count, 1)


def build(out: Path, recipe: TaskModelRecipe | None = None, progress: Callable[[int, int, float], None] | None = None
          ) -> None:
    """Pretrain the recipe's model and write folder `out` (created): weights, tokenizer, SOURCE.json, SOURCE.md."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from pipeline.runtime.fingerprint import sha256_file
    from pipeline.runtime.model_zoo import _utc_now, _version_of

    recipe = recipe or DEFAULT_RECIPE
    started = time.monotonic()
    tokenizer = task_tokenizer()
    samples = tokenized_samples(pretraining_conversations(recipe), tokenizer)
    check = tokenized_samples(pretraining_conversations(recipe, 256, purpose="check"), tokenizer)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer)).float()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    trained = pretrain(model, samples, recipe, progress)
    check_nll = mean_nll(model, check)
    out.mkdir(parents=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors writes 0600; a shared cache should be readable by all
        path.chmod(0o644)
    tail = trained.losses[-max(1, len(trained.losses) // 20):]
    provenance = {
        "name": NAME,
        "description": f"tiny Llama ({recipe.layers} layers, hidden {recipe.hidden}, vocab {len(tokenizer)}) "
                       f"pretrained on clean {', '.join(recipe.pretrain_kinds)}",
        "fingerprint": recipe.fingerprint(),
        "version": TASK_MODEL_VERSION,
        "recipe": recipe.as_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": len(tokenizer),
        "pretrain": {"steps": trained.steps, "kept_tokens": trained.kept_tokens, "seconds": round(trained.seconds, 1),
                     "final_loss": round(sum(tail) / len(tail), 4), "check_nll": round(check_nll, 4)},
        "build_seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "weights_sha256": sha256_file(out / "model.safetensors"),
        "built_at": _utc_now(),
        "torch": _version_of("torch"),
        "transformers": _version_of("transformers"),
    }
    (out / "SOURCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "SOURCE.md").write_text(
        f"# {provenance['description']}\n\nBuilt by pipeline/eval/task_model.py from the recipe in SOURCE.json "
        f"(fingerprint {provenance['fingerprint'][:16]}); delete this folder to rebuild it.\n"
    )


def ensure_task_model(recipe: TaskModelRecipe | None = None, cache_dir: Path | None = None,
                      progress: Callable[[int, int, float], None] | None = None) -> Path:
    """The recipe's model folder under the model cache, built first when it is not there (a cache hit otherwise)."""
    from pipeline.runtime.model_zoo import build_once, cache_root

    target = Path(cache_dir or cache_root()) / "models" / folder_name(recipe)
    return build_once(target, lambda out: build(out, recipe, progress))

