"""Sanity check of the converted real model (not collected by pytest; run by hand).

    python -m tests.benchmarks.check_real_model [--cache-dir DIR]

Fetches (or reuses) SmolLM2-135M-Instruct, then prints the mean NLL of a plain English paragraph
(expect about 3; a broken conversion gives about ln V = 10.8) and the greedy answer to a ChatML
question about the capital of France (expect "Paris").
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.runtime.model_zoo import ensure_model

PARAGRAPH = (
    "The river runs through the middle of the old town, and on summer evenings people sit along "
    "its banks to watch the boats go by. Most of the houses near the water were built more than "
    "two hundred years ago, when the town was a busy market for wool and grain. Today the market "
    "square is full of small cafes, and tourists come from all over the country to walk its narrow streets."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    arguments = parser.parse_args()

    started = time.perf_counter()
    folder = ensure_model("smollm2-135m", arguments.cache_dir)
    print(f"model folder: {folder} ({time.perf_counter() - started:.1f} s to ensure)")

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"load: {time.perf_counter() - started:.1f} s")

    with torch.inference_mode():
        ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
        loss = model(input_ids=ids, labels=ids).loss.item()
        print(f"mean NLL on the paragraph: {loss:.3f} over {ids.shape[1] - 1} targets (ln V = {math.log(len(tokenizer)):.1f})")

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
        answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"greedy answer: {answer!r} -> {'OK' if 'Paris' in answer else 'UNEXPECTED'}")


if __name__ == "__main__":
    main()
