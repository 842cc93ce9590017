"""The SFT stage: tokens + keep masks + a starting model in, a fine-tuned Hugging Face checkpoint out, on Ray Train.

    run_train(TrainConfig(data=TOKENIZED, masks=SCORES_OR_MASKS, model=MODEL, output=DIR)) -> StageSummary

Output layout:
    DIR/masks/          selection online only: the tokens each step selected and trained on (a masks folder,
                        one shard per optimizer step; pipeline.training.online_stage)
    DIR/checkpoint/     the trained model: safetensors (LoRA merged), config.json, tokenizer files
    DIR/metrics.jsonl   one JSON line per optimizer step: step, loss, kept_tokens, tokens, tokens_per_s, lr, ...
    DIR/train/          Ray Train storage (resumable checkpoints) while the run is unfinished; removed at the end
    DIR/manifest.json   written last: config, data/masks/model fingerprints, the final checkpoint's, figures

The loss is the mean NLL over the kept tokens of each global batch (pipeline.training.masked_loss),
one optimizer step per global batch, on `workers` data-parallel ranks (`pipeline.training.train_worker`)
of a Ray Train v2 `TorchTrainer` (or, with `runner: process`, one worker in this process:
`pipeline.training.train_in_process`): one embedded worker by default (`ray_session`, so a caller can
run score and train in one Ray session), `--workers N [--use-gpu]` on a cluster. Each rank reads its
own rows of the Parquet shards (Ray Data is not used: it stalls when the workers hold every CPU).

Exactly once through the stage runner (`pipeline.runtime.stage_runner`: locked; files it did not
write refused; checkpoint/ and metrics.jsonl its entries, train/ scratch). A killed run resumes
from its last reported checkpoint (`train/run-<identity>`), and since the data order, learning
rate and dropout are pure functions of the step, it ends with the tensors an uninterrupted run
has, whichever checkpoint the Ray Train controller kept. The final checkpoint is written under
train/ and installed as checkpoint/ when complete; a rerun of a finished output whose checkpoint
is unchanged returns at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pipeline.runtime.checkpoints import checkpoint_files, checkpoint_fingerprint, load_tokenizer
from pipeline.runtime.errors import UserError, refusal_from_os_error
from pipeline.runtime.files import MANIFEST, ArtifactError, base_manifest, read_manifest
from pipeline.runtime.fingerprint import sha256_json, tokenizer_fingerprints, tokenizer_mismatch
from pipeline.runtime.ray_session import RayRuntime, machine_cpus, node_cpus, ray_session, task_error_cause
from pipeline.runtime.stage_output import StageOutput, StageSummary
from pipeline.runtime.stage_runner import Stage, run_stage
from pipeline.training.online_stage import masks_run_key, prepare_online, run_masks
from pipeline.training.train_config import TrainConfig
from pipeline.training.train_in_process import fit_in_process
from pipeline.training.train_metrics import METRICS, read_metrics, train_curve
from pipeline.training.train_settings import accumulation_steps
from pipeline.training.train_worker import FINAL, RankJob, ray_train_loop, schedule_of
from pipeline.training.training_data import DataPlan, build_index, open_training_data

__all__ = ["TrainConfig", "run_train"]

CHECKPOINT = "checkpoint"
WORK = "train"
MASKS = "masks"  # selection online: the masks folder the steps write


def _check_model(config: TrainConfig, recorded: dict[str, Any]) -> str:
    """The starting model's fingerprint, after checking it is a Hugging Face folder with the data's tokenizer and
    chat template (`recorded`: the tokenized manifest's tokenizer entry); the trained checkpoint ships them."""
    checkpoint_files(config.model)
    found = tokenizer_fingerprints(load_tokenizer(config.model, trust_remote_code=config.trust_remote_code))
    problem = tokenizer_mismatch(recorded, found, config.data, config.model)
    if problem is not None:
        raise UserError(problem)
    return checkpoint_fingerprint(config.model)


def _tokenized_manifest(data: Path) -> dict[str, Any]:
    if not Path(data).is_dir():
        raise ArtifactError(f"tokenized data folder {data} does not exist; run `sstoken prepare` first")
    return read_manifest(data, kind="tokenized")


def _plan(config: TrainConfig, samples: int) -> DataPlan:
    try:
        accumulation_steps(config.batch_size, config.micro_batch_size, config.workers)
    except ValueError as error:
        raise UserError(str(error)) from None
    plan = DataPlan(samples, config.batch_size, config.micro_batch_size, config.workers, config.seed, config.epochs)
    if plan.steps == 0:
        raise UserError(
            f"batch_size {config.batch_size} is more than the {samples} samples with kept tokens x epochs "
            f"{config.epochs:g}: not one optimizer step; lower batch_size or raise epochs"
        )
    return plan


def _cpus_per_worker(config: TrainConfig, runtime: RayRuntime) -> float:
    """CPUs each worker reserves; refuses what an embedded Ray can never hold (Ray would wait forever)."""
    cpus = config.cpus_per_worker
    if cpus is None:
        largest = max(node_cpus(), default=1.0)
        cpus = max(1.0, min(largest, float(int(runtime.cpus // config.workers))))
    if runtime.embedded and config.workers * cpus > runtime.cpus:
        raise UserError(
            f"--workers {config.workers} x {cpus:g} CPUs exceed the embedded Ray's {runtime.cpus:g} CPUs; lower "
            "--workers or --cpus-per-worker, raise --ray.num-cpus, or run on a cluster (--ray.address)"
        )
    if config.use_gpu and runtime.gpus < config.workers:
        raise UserError(
            f"--use-gpu with --workers {config.workers} needs {config.workers} GPUs; the Ray cluster has {runtime.gpus:g}"
        )
    return cpus


def _process_cpus(config: TrainConfig) -> float:
    """runner process: the torch threads of the one worker (its CPUs), at most this machine's."""
    return min(float(machine_cpus()), config.cpus_per_worker or float(config.ray.num_cpus or machine_cpus()))


class _MetricsProgress:
    """A rich progress bar on stderr fed by tailing metrics.jsonl (rank 0 writes it), in a thread."""

    def __init__(self, enabled: bool, path: Path, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.path, self.total = path, total
        self.bar = Progress(
            TextColumn("training steps"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, figures="")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _MetricsProgress:
        self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.stop()

    def _follow(self) -> None:
        while not self.stop.wait(0.5):
            self._update()

    def _update(self) -> None:
        try:
            metrics = read_metrics(self.path)  # a line half written is left out: the next poll sees it
        except (OSError, ArtifactError):
            return
        last = metrics[-1] if metrics else None
        if last is not None:
            figures = f"loss {last['loss']:.3f}  {last['tokens_per_s']:,.0f} tokens/s  lr {last['lr']:.2e}"
            self.bar.update(self.task, completed=last["step"], figures=figures)


def _fit(config: TrainConfig, job: RankJob, cpus: float, work: Path, run_name: str) -> None:
    """Run the Ray Train v2 TorchTrainer to its end (resuming the run's last checkpoint); raise the workers' error."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config=job.as_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(work.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as error:
        failures = [task_error_cause(failure) for _, failure in sorted(error.worker_failures.items())]
        user = next((f for f in failures if isinstance(f, UserError)), None)
        if user is not None:
            raise user from None
        # A worker's disk full (or read-only, or denied) is the user's to fix: one line, as in every stage.
        refusals = [refusal_from_os_error(f, where=config.output) for f in failures if isinstance(f, OSError)]
        refusal = next((r for r in refusals if r is not None), None)
        if refusal is not None:
            raise refusal from error
        raise




def run_train(config: TrainConfig) -> StageSummary:
    """Fine-tune `config.model` on the kept tokens of `config.data`; returns the run's summary."""
    started = time.monotonic()
    output = Path(config.output)
    online = None
    if config.selection == "online":
        tokenized = _tokenized_manifest(config.data)
        model_fp = _check_model(config, tokenized["tokenizer"])
        online = prepare_online(config, model_fp, tokenized)
        index = online.index
        inputs = [{"kind": "tokenized", "path": str(config.data), "data_fingerprint": online.source.data_key}]
        identity = {"settings": config.train_settings().run_key_settings(), "data": online.source.data_key,
                    "model": model_fp} | online.identity()
    else:
        source = open_training_data(config.data, config.masks)
        tokenized = source.tokenized_manifest
        model_fp = _check_model(config, tokenized["tokenizer"])
        index = build_index(source)
        inputs = [{"kind": "tokenized", "path": str(config.data), "data_fingerprint": source.data_key},
                  {"kind": source.masks_manifest["kind"], "path": str(config.masks), "data_fingerprint": source.masks_key}]
        identity = {
            "settings": config.train_settings().run_key_settings(),
            "data": source.data_key,
            "masks": source.masks_key,
            "model": model_fp,
        }
    plan = _plan(config, index.samples)
    in_process = config.ray.runner == "process"
    work_folder = output / WORK
    timings: dict[str, float] = {}

    @contextmanager
    def session() -> Iterator[float]:
        """The Ray session (none for the process runner), then the CPUs each worker gets: nothing in the output
        is touched before the cluster answered and the settings fit it."""
        with nullcontext() if in_process else ray_session(config.ray) as runtime:
            yield _process_cpus(config) if in_process else _cpus_per_worker(config, runtime)

    def work(out: StageOutput, cpus: float) -> dict[str, Any]:
        timings["checks_s"] = time.monotonic() - started
        final_fp = out.installed(CHECKPOINT, checkpoint_fingerprint)  # a killed run had already put it in place
        if final_fp is not None and online is not None and not (output / MASKS / MANIFEST).is_file():
            raise UserError(f"{output / MASKS} is incomplete while the trained checkpoint is in place: the masks of its "
                            "steps cannot be recomputed without training again; pass --overwrite to train again")
        if final_fp is None:
            job = RankJob(
                data=str(Path(config.data).resolve()), masks=str(Path(config.masks).resolve()) if config.masks else "",
                model=str(Path(config.model).resolve()), metrics=str((output / METRICS).resolve()),
                work=str(work_folder.resolve()), settings=config.train_settings().model_dump(), workers=config.workers,
                threads=max(1, int(cpus)), use_gpu=config.use_gpu, trust_remote_code=config.trust_remote_code,
                online=online.job(output / MASKS, masks_run_key(identity)) if online is not None else None,
            )
            work_folder.mkdir(exist_ok=True)
            fit_started = time.monotonic()

            def fit() -> None:
                with _MetricsProgress(config.progress, output / METRICS, plan.steps):
                    if in_process:
                        fit_in_process(job, work_folder)
                    else:
                        _fit(config, job, cpus, work_folder, f"run-{out.identity[:16]}")

            if online is not None:
                run_masks(config, online, output / MASKS, identity, plan.steps, model_fp, fit)
            else:
                fit()
            timings["fit_s"] = time.monotonic() - fit_started
            final = work_folder / FINAL
            if not final.is_dir():
                raise RuntimeError(f"training ended without its final checkpoint in {final}; this is a bug, please report it")
            final_fp = checkpoint_fingerprint(final)
            out.install(CHECKPOINT, final, final_fp)
        timings["total_s"] = time.monotonic() - started
        return _manifest(config, tokenized["tokenizer"], inputs, index, plan, model_fp, final_fp, output, timings)

    def checkpoint_unchanged(out: StageOutput, manifest: dict[str, Any]) -> bool:
        masks_done = online is None or (output / MASKS / MANIFEST).is_file()
        return masks_done and out.installed(CHECKPOINT, checkpoint_fingerprint) == manifest["checkpoints"]["final"]["fingerprint"]

    # train/ (Ray Train's resumable state) is scratch: removed once the checkpoint is in place.
    read = [Path(config.data), Path(config.model), *([Path(config.masks)] if config.masks else [])]
    entries = (CHECKPOINT, METRICS, *([MASKS] if online is not None else []))
    stage = Stage("train", output, identity, inputs=read, overwrite=config.overwrite, entries=entries, scratch=(WORK,))
    run = run_stage(stage, work, ready=session, complete=checkpoint_unchanged)
    return _summary(config, output, run.manifest, reused=run.reused)


def _manifest(config, tokenizer, inputs, index, plan: DataPlan, model_fp: str, final_fp: str, output: Path,
              timings) -> dict[str, Any]:
    metrics = train_curve(output)
    total, warmup = schedule_of(config.train_settings(), plan.steps)
    return base_manifest("train", config.resolved()) | {
        "tokenizer": tokenizer,
        "input_fingerprint": sha256_json([i["data_fingerprint"] for i in inputs]),
        "inputs": inputs,
        "checkpoints": {
            "start": {"path": str(config.model), "fingerprint": model_fp},
            "final": {"path": str(output / CHECKPOINT), "fingerprint": final_fp},
        },
        "shards": [],
        "schedule": {"start_step": config.schedule_start_step, "total_steps": total, "warmup_steps": warmup},
        "counts": {
            "samples": index.samples,
            "samples_without_kept_tokens": index.without_kept,
            "steps": plan.steps,
            "kept_tokens": sum(m["kept_tokens"] for m in metrics),
            "tokens": sum(m["tokens"] for m in metrics),
            "final_loss": metrics[-1]["loss"] if metrics else 0.0,
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _summary(config: TrainConfig, output: Path, manifest: dict[str, Any], reused: bool) -> StageSummary:
    counts = manifest["counts"]
    timings = manifest.get("timings", {})
    fit = timings.get("fit_s")
    return StageSummary(
        stage="train",
        output=output,
        counts=dict(counts),
        timings=dict(timings),
        details={
            "checkpoint": str(output / CHECKPOINT),
            "finetune": config.finetune,
            "workers": config.workers,
            # Ray Train start-up and model loading included.
            "tokens_per_s": counts["tokens"] / fit if fit else 0.0,
        },
        reused=reused,
    )
