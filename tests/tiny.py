"""Tiny offline stand-ins for real tokenizers and models: built from configs in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system Hello! How can I help you today?",
    "def add(a, b):\n    return a + b\n",
    "Tokens are selected by retrospective excess loss and attention importance.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { }",
] * 4


def build_tokenizer(vocab_size: int = 400, chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens, trained in-process."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tokenizer(path: Path, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    build_tokenizer(chat_template=chat_template).save_pretrained(path)
    return Path(path)


TINY_CONFIGS = {
    # Llama with grouped-query attention (4 query heads share 2 key/value heads).
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # Qwen2: another family (biased q/k/v projections), here without GQA.
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def build_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the given family, in fp32, in eval mode."""
    settings = dict(TINY_CONFIGS[family])
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform predictions; widen the weights so NLL and attention vary.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4.0)
    return model.eval()


def save_model(path: Path, family: str, vocab_size: int, seed: int = 0) -> Path:
    build_model(family, vocab_size, seed).save_pretrained(path, safe_serialization=True)
    return Path(path)
