"""The train stage's online side: the history NLLs it trains against, and the masks folder its steps write.

    online = prepare_online(config, model_fp)        # refusals first: data, history checkpoint, its cached NLLs
    online.job(masks_folder, run_key)                # what each rank needs (an OnlineJob as a dict)
    manifest = online.run_masks(output / "masks", identity, fit)    # fit() trains; the masks folder is finished

The history NLLs come from the score stage's cache (`pipeline.scoring.history_cache`), keyed by the history
checkpoint's fingerprint, the tokenized data's verified key and the precision: nothing here runs the history
model. A cache without this checkpoint, or with it for other data (another corpus or tokenizer), is refused by
name with the command that fills it.

The masks folder (kind masks, masks.v1 shards with their `step` column) is its own exactly-once output, run
by the stage runner inside the train stage's (whose entry it is): the ranks commit one shard per optimizer
step into it while training (`pipeline.training.online_worker`), then the samples no step trained are committed
as `part-untrained.parquet` (nothing kept, step 0) and the manifest is written last. `validate`, `inspect`,
`report`, `export` and the stats API read it as any masks folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.runtime.checkpoints import checkpoint_files, checkpoint_fingerprint, load_tokenizer
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import base_manifest
from pipeline.runtime.fingerprint import sha256_json, tokenizer_fingerprints, tokenizer_mismatch
from pipeline.runtime.stage_output import StageOutput, read_record
from pipeline.runtime.stage_runner import Stage, run_stage
from pipeline.scoring.history_cache import history_cache_dir
from pipeline.scoring.precision import precision_name
from pipeline.scoring.score_stage import default_history_cache
from pipeline.selection.methods import same_checkpoint_refusal
from pipeline.training.online_data import OnlineSource, all_samples, online_index, open_online_data
from pipeline.training.online_settings import OnlineSettings
from pipeline.training.online_step import selection_mask_table, untrained_selections
from pipeline.training.online_worker import OnlineJob, step_shard
from pipeline.training.train_config import TrainConfig
from pipeline.training.training_data import SampleIndex, shards_key

UNTRAINED = "part-untrained.parquet"


def _fill_command(config: TrainConfig, root: Path) -> str:
    history = config.online.history
    return (f"`sstoken score --data {config.data} --current {history} --cache-current-nll --history-cache {root}` "
            "(or score any current model with this --history and cache)")


def history_folder(config: TrainConfig, history_fp: str, data_key: str, device: str) -> Path:
    """The cache folder of the history NLLs of `config.data`; refuses a cache without them, by name."""
    root = Path(config.online.history_cache) if config.online.history_cache else default_history_cache()
    wanted = precision_name(config.dtype, device)
    data = history_cache_dir(root, history_fp, data_key, wanted).parent
    checkpoint = data.parent
    if not checkpoint.is_dir():
        raise UserError(
            f"the history cache {root} holds no NLLs of {config.online.history} (checkpoint fingerprint "
            f"{history_fp[:12]}): it was filled for other checkpoints, or not at all; fill it with {_fill_command(config, root)}"
        )
    if not data.is_dir():
        raise UserError(
            f"the history cache {checkpoint} holds NLLs of {config.online.history} for other tokenized data (another "
            f"corpus or tokenizer), not for {config.data}; fill it with {_fill_command(config, root)}"
        )
    found = sorted(p.name for p in data.iterdir() if p.is_dir())
    if wanted in found:
        return data / wanted
    if len(found) == 1:
        return data / found[0]
    raise UserError(f"the history cache {data} holds no NLLs in {wanted} precision (it has {', '.join(found) or 'none'}); "
                    f"fill it with {_fill_command(config, root)} --dtype {config.dtype}")


@dataclass(frozen=True)
class OnlinePlan:
    """An online training's checked inputs: the data with its history NLLs, and the history checkpoint."""

    settings: OnlineSettings
    source: OnlineSource
    index: SampleIndex
    history_fp: str | None

    def identity(self) -> dict[str, Any]:
        """What the selection depends on (paths aside): the settings and the history checkpoint."""
        settings = {k: v for k, v in self.settings.resolved().items() if k not in ("history", "history_cache")}
        return {"online": settings, "history": self.history_fp}

    def job(self, masks: Path, run_key: str) -> dict[str, Any]:
        history = str(self.source.history.resolve()) if self.source.history is not None else None
        return asdict(OnlineJob(self.settings.model_dump(mode="json"), history, str(Path(masks).resolve()), run_key))


def _check_history_model(config: TrainConfig, tokenizer: dict[str, Any]) -> str:
    history = Path(config.online.history)  # type: ignore[arg-type]
    checkpoint_files(history)
    if any((history / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        found = tokenizer_fingerprints(load_tokenizer(history, trust_remote_code=config.trust_remote_code))
        problem = tokenizer_mismatch(tokenizer, found, config.data, history, template=False)
        if problem is not None:
            raise UserError(problem)
    return checkpoint_fingerprint(history)


def prepare_online(config: TrainConfig, model_fp: str, tokenized: dict[str, Any]) -> OnlinePlan:
    """Every refusal of an online training before anything is written; `tokenized`: the data's manifest."""
    settings = config.online
    history_fp, folder = None, None
    if settings.uses_rel and not settings.moving_history:
        if settings.history is None:
            raise UserError(f"online method {settings.method} ranks REL: pass --online.history, the checkpoint whose "
                            "NLLs the score stage cached")
        history_fp = _check_history_model(config, tokenized["tokenizer"])
        if history_fp == model_fp and settings.rel_only and settings.warmup_samples == 0:
            try:
                same_checkpoint_refusal(settings)
            except UserError as error:
                raise UserError(f"{error}; or attention-only steps first: online.warmup_samples") from None
        device = "cuda" if config.use_gpu else "cpu"
        folder = history_folder(config, history_fp, shards_key(tokenized), device)
    source = open_online_data(config.data, folder)
    return OnlinePlan(settings, source, online_index(source), history_fp)


def _counts(folder: Path, shards: list[dict[str, Any]], steps: int) -> dict[str, int]:
    tables = [pq.read_table(folder / s["file"], columns=["n_tokens", "n_trainable", "n_kept"]) for s in shards]
    total = {name: sum(int(pc.sum(t.column(name)).as_py() or 0) for t in tables) for name in ("n_tokens", "n_trainable", "n_kept")}
    return {"shards": len(shards), "samples": sum(t.num_rows for t in tables), "tokens": total["n_tokens"],
            "trainable": total["n_trainable"], "kept": total["n_kept"], "steps": steps}


def run_masks(
    config: TrainConfig, plan: OnlinePlan, folder: Path, identity: dict[str, Any], steps: int, model_fp: str,
    fit: Callable[[], None],
) -> dict[str, Any]:
    """Train (`fit`, whose rank commits a shard per step into `folder`), then finish the masks folder; a finished
    one of this identity is reused as it is (the training it records is done)."""

    def work(out: StageOutput, _: Any) -> dict[str, Any]:
        fit()
        trained = set()
        shards = []
        for step in range(1, steps + 1):
            record = read_record(folder, step_shard(step))
            if record is None or record.get("run_key") != out.identity:
                raise RuntimeError(f"training ended without the masks of step {step} in {folder}; this is a bug")
            trained |= set(pq.read_table(folder / record["file"], columns=["sample_id"]).column("sample_id").to_pylist())
            shards.append({"file": record["file"], "rows": record["rows"], "sha256": record["sha256"]})
        left = [s for s in all_samples(plan.source) if s[0] not in trained]
        record = out.commit(UNTRAINED, selection_mask_table(untrained_selections(left), 0), {"run_key": out.identity})
        shards.append({"file": UNTRAINED, "rows": record["rows"], "sha256": record["sha256"]})
        return _manifest(config, plan, folder, shards, _counts(folder, shards, steps), model_fp)

    stage = Stage("masks", folder, identity, inputs=[Path(config.data), Path(config.model)], overwrite=config.overwrite)
    return run_stage(stage, work).manifest


def masks_run_key(identity: dict[str, Any]) -> str:
    """The run key the ranks commit the step shards under: the masks folder's identity (StageOutput's digest)."""
    return sha256_json(identity)


def _manifest(config: TrainConfig, plan: OnlinePlan, folder: Path, shards: list[dict[str, Any]],
              counts: dict[str, int], model_fp: str) -> dict[str, Any]:
    settings = plan.settings
    tokenized = {"kind": "tokenized", "path": str(config.data), "data_fingerprint": plan.source.data_key}
    checkpoints = {"current": {"path": str(config.model), "fingerprint": model_fp}}
    if plan.history_fp is not None:
        checkpoints["history"] = {"path": str(settings.history), "fingerprint": plan.history_fp}
    warnings = sorted({w for s in shards for w in (read_record(folder, s["file"]) or {}).get("warnings", [])})
    selection = settings.select_settings().selection_key() | {
        "online": True, "layer": settings.layer, "excess": settings.excess, "history_policy": settings.history_policy,
        "warmup_steps": settings.warmup_steps(config.batch_size),
    }
    return base_manifest("masks", config.resolved()) | {
        "tokenizer": plan.source.manifest["tokenizer"],
        "input_fingerprint": plan.source.data_key,
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "inputs": [tokenized],
        "checkpoints": checkpoints,
        "selection": selection | ({"warnings": warnings} if warnings else {}),
        "shards": shards,
        "counts": counts,
    }
