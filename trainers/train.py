"""The training loop: dataset, caches, LoRA, ppsf_optim with the fused backward pass, samples, checkpoints.

`train(config)` starts a run in runs/<name>/, `resume(run_dir)` continues one from its last checkpoint so
that the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ppsf_optim import ProdigyPlusScheduleFree
from trainers import run_folder, stop
from trainers.atomic import atomic_write, atomic_write_text
from trainers.batches import epoch_batches, micro_batch_seed, steps_per_epoch
from trainers.cache import (
    TensorCache,
    cache_root,
    file_digest,
    latent_cache,
    latent_key,
    text_cache,
    text_key,
)
from trainers.checkpoint import (
    TrainerState,
    broken_checkpoints,
    list_checkpoints,
    load_checkpoint,
    named_parameters,
    recover_run_folder,
    restore_python_rng,
    save_checkpoint,
    saved_trainer_state,
)
from trainers.checks import config_problems, config_warnings, distributed_problems
from trainers.config import DEMO_SCHEME, ConfigError, TrainConfig, dump_config, load_config, resolved_config
from trainers.control import ControlChannel, ControlError
from trainers.dataset import (
    ImageItem,
    assign_buckets,
    bucket_summary,
    crop_warnings,
    load_image,
    process_caption,
    scan_dataset,
)
from trainers.distributed import DataParallel, from_environment, micro_batches_per_step
from trainers.events import read_events
from trainers.export_run import EXPORT_METADATA_FILE, export_checkpoint
from trainers.freeze import auto_freeze_due, auto_freeze_window, manual_freeze_refusal, prodigy_steps_for
from trainers.health import HealthMonitor
from trainers.models import ModelAdapter, SampleConditioning, adapter_for
from trainers.paths import resolve_dataset_path, resolve_model_path
from trainers.validation import Validator, build_validator, split_dataset

CONFIG_FILE = "config.toml"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what to try."""


@dataclass
class PreparedData:
    root: Path
    items: list[ImageItem]
    buckets: list[tuple[int, int]]  # per item
    skipped: list[tuple[Path, str]]
    held_out: list[ImageItem]  # held out for validation (dataset.validation as a fraction)


@dataclass
class _Session:
    """Everything one run's loop works on."""

    adapter: ModelAdapter
    optimizer: ProdigyPlusScheduleFree
    params: dict[str, torch.nn.Parameter]
    generator: torch.Generator  # noise and timesteps
    rng: random.Random  # caption shuffling/dropout and random crops
    state: TrainerState
    data: PreparedData
    total_steps: int
    latents: TensorCache | None
    texts: TensorCache | None
    health: HealthMonitor
    validator: Validator | None
    loss_fn: Callable[..., torch.Tensor]  # the adapter's training loss, through DDP when distributed
    batches: list[list[int]] | None = None  # the current epoch's order


def _due(every: int, step: int, total_steps: int) -> bool:
    """A periodic action at `step` (the final step has its own)."""
    return bool(every) and step % every == 0 and step < total_steps


def train(config: TrainConfig) -> Path:
    """Start a new run; returns its folder. Under `accelerate launch` all processes form this one run.

    A folder with checkpoints is refused (resume it, or choose another name); one where an earlier attempt
    never reached a checkpoint starts over, with that attempt's files moved aside (trainers/run_folder.py).
    """
    run_dir = config.run_dir
    problems = config_problems(config)
    if problems:  # before the run folder is touched: a wrong path leaves nothing behind
        raise ConfigError(problems)
    parallel = from_environment()
    held = contextlib.ExitStack()  # process 0's lock on the run folder, until the run ends

    def make_run_folder() -> ControlChannel:
        controls = held.enter_context(run_folder.trainer_lock(run_dir))
        recover_run_folder(run_dir)  # first: a checkpoint caught between two renames is put back in place
        if run_folder.has_checkpoint_folders(run_dir):
            raise ConfigError([_occupied_message(run_dir)])
        moved = run_folder.set_aside_attempt(run_dir)
        if moved is not None:
            print(
                f"{run_dir} held an attempt that never reached a checkpoint ({moved.reason}); starting over, "
                f"its files are in {moved.folder}",
                file=sys.stderr,
            )
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(resolved_config(config)))
        return controls

    try:
        controls = parallel.main_only(make_run_folder, failure=TrainingError)
        return Trainer(config, parallel=parallel, controls=controls).run(resume_from=None)
    finally:
        held.close()
        parallel.close()


def _occupied_message(run_dir: Path) -> str:
    done = run_folder.finished_event(run_dir)
    if done is not None:
        files = ", ".join(Path(p).name for p in done.get("exported", []))
        return (
            f"name: run folder {run_dir} already holds a run, finished (step {done.get('step')}; {files}); "
            "choose another name (--set name=...)"
        )
    return (
        f"name: run folder {run_dir} already holds a run with checkpoints; continue it with "
        f"`python -m trainers resume {run_dir}` or choose another name (--set name=...)"
    )


def resume(run_dir: Path, config_path: Path | None = None, overrides: Sequence[str] = ()) -> Path:
    """Continue a run from its newest intact checkpoint (or start it over if it has none), on any number
    of processes.

    A finished run is not touched (its `done` event stays the last word). `config_path` replaces the saved
    config of a run that never reached a checkpoint (the usual fix after it failed to start); a run with
    checkpoints keeps its own config, so that resuming stays exact; `overrides` (--set) apply to
    `config_path` only.
    """
    run_dir = Path(run_dir)
    if config_path is None or not run_dir.is_dir():  # with a config, any folder the run began in will do
        run_folder.require_run(run_dir)
    if config_path is None and run_folder.finished_event(run_dir) is not None:
        return run_dir
    parallel = from_environment()
    held = contextlib.ExitStack()  # process 0's lock on the run folder, until the run ends

    def take_run_folder() -> ControlChannel:
        controls = held.enter_context(run_folder.trainer_lock(run_dir))
        recover_run_folder(run_dir)
        return controls

    try:
        controls = parallel.main_only(take_run_folder, failure=TrainingError)
        config = _resume_config(run_dir, config_path, overrides)
        if config_path is not None:
            parallel.main_only(
                lambda: atomic_write_text(run_dir / CONFIG_FILE, dump_config(resolved_config(config))),
                failure=TrainingError,
            )
        checkpoints = list_checkpoints(run_dir)
        resume_from = checkpoints[-1][1] if checkpoints else None
        if not parallel.same_on_all_ranks([checkpoints[-1][0] if checkpoints else -1]):
            raise TrainingError(
                f"the processes find different checkpoints in {run_dir}: on several machines the run "
                "folder (output_dir) must be on a filesystem they all share"
            )
        warnings = [
            f"checkpoint {problem}; resuming from {resume_from or 'the start'} instead"
            for problem in broken_checkpoints(run_dir)
        ]
        trainer = Trainer(config, run_dir=run_dir, parallel=parallel, controls=controls)
        return trainer.run(resume_from, warnings)
    finally:
        held.close()
        parallel.close()


def _resume_config(run_dir: Path, config_path: Path | None, overrides: Sequence[str]) -> TrainConfig:
    """The config a resume continues with: the run's own, or `config_path` for a run without checkpoints."""
    checkpoints = list_checkpoints(run_dir)
    if config_path is not None:
        if checkpoints:
            raise ConfigError(
                [
                    f"--config: {run_dir} has checkpoints (step {checkpoints[-1][0]}), so it continues with "
                    f"its own config.toml; drop --config, or start a new run with "
                    f"`python -m trainers train {config_path} --set name=...`"
                ]
            )
        config = _config_for_folder(load_config(config_path, list(overrides)), run_dir)
        problems = config_problems(config)
        if problems:
            raise ConfigError(problems)
        return config
    config = load_config(run_dir / CONFIG_FILE)
    problems = [] if checkpoints else config_problems(config)
    if problems:
        raise ConfigError(
            [
                *problems,
                f"{run_dir} has no checkpoint yet, so nothing is lost by fixing its config: give the fixed "
                f"file with `python -m trainers resume {run_dir} --config FILE`, or `train` it again "
                "(the same name starts over)",
            ]
        )
    return config


def _config_for_folder(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """`config` writing into `run_dir`, whatever name and output_dir it gives."""
    return config.model_copy(update={"name": run_dir.name, "output_dir": str(run_dir.parent)})


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path | None = None,
        parallel: DataParallel | None = None,
        controls: ControlChannel | None = None,
    ) -> None:
        """`controls`: the run folder's lock as `train`/`resume` hold it; without it, `run` takes it."""
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else config.run_dir
        self.parallel = parallel or DataParallel()  # this process's rank among the run's processes
        self.device = self.parallel.device
        self.controls = controls or ControlChannel(self.run_dir)
        self._owns_lock = controls is None

    @property
    def stop_requested(self) -> bool:
        return stop.requested() or self.controls.stop_requested

    # ------------------------------------------------------------------ the run
    def run(self, resume_from: Path | None, warnings: Sequence[str] = ()) -> Path:
        """Train to the end (or to a stop request); `warnings` are reported as events first."""
        try:
            if self._owns_lock and self.parallel.is_main:  # process 0 holds it and reads the requests
                self.controls.acquire()  # from here on the run counts as running for `trainers control`
        except ControlError as error:
            raise TrainingError(str(error)) from None
        # a stop asked for while models load is honoured before the first step
        previous_handlers = stop.install()
        threads = torch.get_num_threads()  # a demo run on a CPU takes one (see _run)
        events = None
        try:
            events = self.events = self.parallel.event_log(self.run_dir)  # rank 0 writes the events
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
                events.write("warning", code="checkpoint_broken", message=warning)
            self._run(resume_from)
        except KeyboardInterrupt:
            self._report("stopped", message="aborted by a second Ctrl-C", **self._last_checkpoint_info())
            raise
        except Exception as error:
            if isinstance(error, OSError) and error.errno is not None:  # a full disk, a read-only folder, ...
                raise TrainingError(self._write_failure_message(error)) from None
            self._report(
                "error", message=self.parallel.failure_message(error), **self._last_checkpoint_info()
            )
            raise
        finally:
            stop.restore(previous_handlers)
            torch.set_num_threads(threads)
            if events is not None:
                with contextlib.suppress(OSError):  # what could not be written is reported already
                    if self.parallel.is_main:
                        self._refuse_controls("the run ended before acting on it")
                    events.close()
            if self._owns_lock:
                self.controls.release()
        return self.run_dir

    def _report(self, event_type: str, **fields) -> None:
        """Write a final event if the disk still takes it (a failed write must not hide the error)."""
        with contextlib.suppress(OSError, AttributeError):
            self.events.write(event_type, **fields)

    def _write_failure_message(self, error: OSError) -> str:
        """One message for a failed write: what failed, the last intact checkpoint, and what to do."""
        info = self._last_checkpoint_info()
        what = f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        saved = (
            f"the last intact checkpoint is {info['last_checkpoint']} (step {info['last_checkpoint_step']})"
            if info["last_checkpoint"]
            else "no checkpoint was saved yet, so it starts from step 0"
        )
        message = (
            f"training stopped: {'the disk is full: ' if full else ''}{what}. {saved}. "
            f"{'Free space' if full else 'Fix that (free space, folder permissions)'}, "
            f"then continue with `python -m trainers resume {self.run_dir}`."
        )
        self._report("error", message=message, **info)
        return message

    def _run(self, resume_from: Path | None) -> None:
        config = self.config
        self.micro_batches_per_step = self._micro_batches_per_step(resume_from)
        problems = config_problems(config) + distributed_problems(
            config, self.parallel.world_size, self.micro_batches_per_step
        )
        if problems:
            raise ConfigError(problems)
        adapter_class = adapter_for(config.model.family)
        adapter_class.check_device(config, self.device)  # e.g. an 8-bit format this device cannot run
        if config.model.path.startswith(DEMO_SCHEME) and self.device.type == "cpu":
            # a demo model's tensors are tiny: more threads only wait on each other (minutes on a busy CPU)
            torch.set_num_threads(1)
        for message in config_warnings(config):
            print(f"warning: {message}", file=sys.stderr)
            self.events.write("warning", code="config", message=message)
        torch.manual_seed(config.training.seed)
        data = self._prepare_data()
        validator = build_validator(config, data.held_out)  # its images are checked before any model loads
        total_steps = self._total_steps(data)
        self.events.write(
            "start",
            step=0,
            total_steps=total_steps,
            resumed_from=str(resume_from) if resume_from else None,
            device=str(self.device),
            world_size=self.parallel.world_size,
            global_batch_size=config.training.batch_size * self.micro_batches_per_step,
        )
        if self._stopped_before_the_first_step():
            return

        local_model = config.model.model_copy(update={"path": resolve_model_path(config.model.path)})
        adapter = adapter_class(config.model_copy(update={"model": local_model}), self.device)
        adapter.load()

        def fill_caches() -> tuple[TensorCache | None, TensorCache | None]:
            latents, texts = self._fill_caches(adapter, data)
            if validator is not None:
                validator.prepare(adapter, latents, texts)  # encoded once, while the encoders are loaded
            return latents, texts

        # rank 0 fills the caches while the others wait, then they read them
        latents, texts = self.parallel.main_first(fill_caches, TrainingError)
        adapter.prepare_samples(config.sampling.prompts)  # while the text encoders are on the device
        adapter.offload_encoders()
        torch.manual_seed(config.training.seed)  # LoRA init must not depend on what the caches held
        params_by_component = adapter.add_lora()
        if config.training.gradient_checkpointing:
            adapter.set_gradient_checkpointing()
        optimizer = self._make_optimizer(params_by_component, total_steps)
        self._write_export_metadata(adapter, data)
        params = named_parameters(adapter.lora_modules())
        generator = torch.Generator(self.device).manual_seed(config.training.seed)

        state = TrainerState(step=0, epoch=0, batch_in_epoch=0)
        rng = random.Random(config.training.seed)
        if resume_from is not None:
            state = load_checkpoint(resume_from, params, optimizer, generator)
            restore_python_rng(rng, state.python_rng)
        state.micro_batches_per_step = self.micro_batches_per_step
        # after loading: DDP starts every rank from rank 0's LoRA
        loss_fn = self.parallel.training_loss(adapter, optimizer, config.optimizer.fused_back_pass)
        self.events.truncate_after(state.step)  # a resumed run repeats what came after its checkpoint
        health = HealthMonitor(config, self.events, total_steps, self.group_names, len(data.items))
        kept = read_events(self.run_dir)
        health.restore(kept)  # the warnings already given, and the d's and losses they look back on
        if validator is not None:
            validator.restore(kept)
        if resume_from is not None:
            self.events.write("resumed", step=state.step, checkpoint=str(resume_from))
        health.at_start(state.step)
        self._loop(
            _Session(
                adapter,
                optimizer,
                params,
                generator,
                rng,
                state,
                data,
                total_steps,
                latents,
                texts,
                health,
                validator,
                loss_fn,
            )
        )

    def _stopped_before_the_first_step(self, **step) -> bool:
        stopped = self.parallel.any_rank(self.stop_requested)  # all processes stop, or none
        if stopped:
            self.events.write("stopped", message="stopped before the first step; nothing to save", **step)
        return stopped

    def _loop(self, run: _Session) -> None:
        config, state = self.config, run.state
        if self._stopped_before_the_first_step(step=state.step):
            return
        progress = tqdm(
            total=run.total_steps,
            initial=state.step,
            desc=config.name,
            unit="step",
            dynamic_ncols=True,
            disable=not self.parallel.is_main,
        )
        try:
            while state.step < run.total_steps:
                started = time.perf_counter()
                loss, samples = self._train_step(run)
                state.step += 1
                state.samples_seen += samples
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {state.step}. Try a lower optimizer.d_coef, "
                        "training.precision bf16 instead of fp16, or check the dataset; resume from the last "
                        "checkpoint with `python -m trainers resume RUN_DIR` after changing the config."
                    )
                self._log_step(run.optimizer, state, loss, time.perf_counter() - started, samples)
                progress.set_postfix(loss=f"{loss:.4f}", d=f"{run.optimizer.param_groups[0]['d']:.2e}")
                progress.update(1)
                self._maybe_freeze(run.optimizer, state, run.total_steps)
                run.health.after_step(state.step, loss, run.optimizer)
                if run.validator is not None and run.validator.due(state.step, run.total_steps):
                    self._validate(run)
                self._act_on_controls(run)
                if _due(config.sampling.every_n_steps, state.step, run.total_steps):
                    self._sample(run.adapter, run.optimizer, state.step)
                if self.parallel.any_rank(self.stop_requested):  # all ranks stop at the same step
                    self._checkpoint(run)
                    self.events.write(
                        "stopped", step=state.step, message="stopped on request; checkpoint saved"
                    )
                    return
                if _due(config.saving.every_n_steps, state.step, run.total_steps):
                    self._checkpoint(run)
        finally:
            progress.close()
        final = self._checkpoint(run)
        if config.sampling.prompts:
            self._sample(run.adapter, run.optimizer, state.step)
        exported = export_checkpoint(self.run_dir, final) if final is not None else []
        self.events.write(
            "done",
            step=state.step,
            exported=[str(p) for p in exported],
            final_d=[g["d"] for g in run.optimizer.param_groups],
            skipped_images=len(run.data.skipped),
        )

    def _train_step(self, run: _Session) -> tuple[float, int]:
        """Forward and backward over this rank's share of the step's micro-batches, then the optimizer;
        (mean loss, samples), both over all ranks."""
        parallel, seed = self.parallel, self.config.training.seed
        # every rank walks all the step's micro-batches, so the data position is the same on all of them
        batches = [self._next_batch(run) for _ in range(self.micro_batches_per_step)]
        positions = parallel.my_positions(self.micro_batches_per_step)
        losses, samples = [], 0
        for n, position in enumerate(positions):
            indices = batches[position]
            # noise, timesteps, captions and LoRA dropout follow from the micro-batch, not the process
            micro_seed = micro_batch_seed(seed, run.state.step, position)
            run.generator.manual_seed(micro_seed)
            run.rng.seed(micro_seed)
            torch.manual_seed(micro_seed)
            with parallel.accumulating(last=n == len(positions) - 1):
                loss = self._micro_batch_loss(run, indices)
                (loss / len(positions)).backward()  # DDP averages over the ranks
            losses.append(loss.detach())
            samples += len(indices)
        run.optimizer.step()  # with the fused pass this only ends a step the backward pass left open
        if not self.config.optimizer.fused_back_pass:
            run.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.stack(losses).sum().item()
        return parallel.step_totals(loss_sum, len(losses), samples)

    def _next_batch(self, run: _Session) -> list[int]:
        """Item indices of the next batch, moving to the next epoch's order when one is used up."""
        state, training = run.state, self.config.training
        repeats = [item.repeats for item in run.data.items]
        if run.batches is None or state.batch_in_epoch >= len(run.batches):
            if run.batches is not None:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            run.batches = epoch_batches(
                run.data.buckets, repeats, training.batch_size, training.seed, state.epoch
            )
            if state.batch_in_epoch >= len(run.batches):  # resumed exactly at the end of an epoch
                return self._next_batch(run)
        state.batch_in_epoch += 1
        return run.batches[state.batch_in_epoch - 1]

    # ------------------------------------------------------------------ data
    def _prepare_data(self) -> PreparedData:
        dataset = self.config.dataset
        root = resolve_dataset_path(dataset.path)
        scan = scan_dataset(root, dataset.caption_extension)
        for path, reason in scan.skipped:
            print(f"warning: skipped {path}: {reason}", file=sys.stderr)
            self.events.write("warning", code="image_skipped", message=f"skipped image {path}: {reason}")
        items, held_out = split_dataset(dataset, scan.items)
        buckets = assign_buckets(items, dataset.resolution, dataset.max_aspect, dataset.no_upscale)
        for message in scan.warnings + crop_warnings(items, buckets, dataset.max_aspect):
            print(f"warning: {message}", file=sys.stderr)
            self.events.write("warning", code="dataset", message=message)
        summary = bucket_summary(buckets)
        print(summary)
        self.events.write(
            "dataset",
            images=len(items),
            held_out=len(held_out),
            samples_per_epoch=sum(item.repeats for item in items),
            skipped=[[str(p), r] for p, r in scan.skipped],
            missing_captions=len(scan.missing_captions),
            buckets={f"{w}x{h}": buckets.count((w, h)) for w, h in sorted(set(buckets))},
        )
        return PreparedData(root=root, items=items, buckets=buckets, skipped=scan.skipped, held_out=held_out)

    def _total_steps(self, data: PreparedData) -> int:
        training = self.config.training
        if training.max_steps:
            return training.max_steps
        per_epoch = steps_per_epoch(
            data.buckets, [i.repeats for i in data.items], training.batch_size, self.micro_batches_per_step
        )
        return per_epoch * training.epochs

    def _micro_batches_per_step(self, resume_from: Path | None) -> int:
        """Micro-batches per optimizer step over all processes: a resumed run keeps its checkpoint's where
        the processes can share them, so it goes on exactly as before."""
        saved = saved_trainer_state(resume_from).micro_batches_per_step if resume_from else 0
        accumulation = self.config.training.gradient_accumulation
        count, warning = micro_batches_per_step(saved, accumulation, self.parallel.world_size)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            self.events.write("warning", message=warning)
        return count

    def _captions_are_fixed(self) -> bool:
        return not self.config.dataset.shuffle_tags and not self.config.lora.train_text_encoder

    def _fill_caches(self, adapter: ModelAdapter, data: PreparedData):
        """Encode whatever is missing from the latent and text caches; returns the caches (or None)."""
        dataset = self.config.dataset
        latents = None
        if dataset.cache_latents and dataset.crop == "center":
            latents = latent_cache(cache_root(data.root, dataset.cache_dir), adapter.cache_fingerprint())
            self.digests = [file_digest(item.path) for item in data.items]
            for index, item in enumerate(tqdm(data.items, desc="caching latents", unit="image", leave=False)):
                key = latent_key(self.digests[index], data.buckets[index], dataset.crop)
                if latents.get(key) is None:
                    latents.put(
                        key, self._encode_image(adapter, item, data.buckets[index], random.Random(key))
                    )
        elif dataset.cache_latents:
            self.events.write(
                "warning",
                code="latents_not_cached",
                message="latents are not cached with dataset.crop = 'random'",
            )
        texts = None
        if dataset.cache_text_embeddings and self._captions_are_fixed():
            texts = text_cache(cache_root(data.root, dataset.cache_dir), adapter.cache_fingerprint())
            captions = {self._caption(item.caption, random.Random(0), dropout=False) for item in data.items}
            if dataset.caption_dropout > 0:
                captions.add("")
            for caption in tqdm(sorted(captions), desc="caching text", unit="caption", leave=False):
                if texts.get(text_key(caption)) is None:
                    with torch.no_grad():
                        texts.put(
                            text_key(caption),
                            {k: v[0] for k, v in adapter.encode_captions([caption]).items()},
                        )
        return latents, texts

    def _encode_image(self, adapter, item: ImageItem, bucket, rng) -> dict[str, torch.Tensor]:
        loaded = load_image(item.path, bucket, self.config.dataset.crop, rng)
        # the VAE's sample is drawn from its own seed, so cached and fresh latents are the same
        generator = torch.Generator(self.device).manual_seed(rng.getrandbits(63))
        latent = adapter.encode_images(loaded.pixels.unsqueeze(0), generator)[0]
        conditioning = torch.tensor([*loaded.original_size, *loaded.crop_top_left, *loaded.target_size])
        return {"latents": latent, "conditioning": conditioning}

    def _caption(self, caption: str, rng: random.Random, dropout: bool = True) -> str:
        dataset = self.config.dataset
        return process_caption(
            caption,
            trigger_word=dataset.trigger_word,
            shuffle_tags=dataset.shuffle_tags,
            keep_tokens=dataset.keep_tokens,
            caption_dropout=dataset.caption_dropout if dropout else 0.0,
            rng=rng,
        )

    def _micro_batch_loss(self, run: _Session, indices: list[int]) -> torch.Tensor:
        adapter, data, rng = run.adapter, run.data, run.rng
        latents_cached, texts_cached = run.latents, run.texts
        entries = []
        for index in indices:
            item = data.items[index]
            if latents_cached is not None:
                key = latent_key(self.digests[index], data.buckets[index], self.config.dataset.crop)
                entry = latents_cached.get(key) or self._encode_image(adapter, item, data.buckets[index], rng)
            else:
                entry = self._encode_image(adapter, item, data.buckets[index], rng)
            entries.append(entry)
        captions = [self._caption(data.items[i].caption, rng) for i in indices]
        if texts_cached is not None:
            cached = [texts_cached.get(text_key(c)) for c in captions]
            if any(c is None for c in cached):
                with torch.no_grad():
                    text = adapter.encode_captions(captions)
            else:
                text = {k: torch.stack([c[k] for c in cached]) for k in cached[0]}
        else:
            text = adapter.encode_captions(captions)
        latents = torch.stack([e["latents"] for e in entries])
        conditioning = [
            SampleConditioning(tuple(c[0:2].tolist()), tuple(c[2:4].tolist()), tuple(c[4:6].tolist()))
            for c in (e["conditioning"] for e in entries)
        ]
        return run.loss_fn(latents, text, conditioning, run.generator).mean()

    # ------------------------------------------------------------------ optimizer
    def _make_optimizer(self, params_by_component, total_steps: int) -> ProdigyPlusScheduleFree:
        opt = self.config.optimizer
        groups = []
        self.group_names = []
        for component, params in params_by_component.items():
            lr = opt.lr if component == next(iter(params_by_component)) else opt.lr * opt.text_encoder_lr
            groups.append({"params": params, "lr": lr})
            self.group_names.append(component)
        kwargs = opt.optimizer_kwargs()
        kwargs["prodigy_steps"] = prodigy_steps_for(opt.prodigy_steps, total_steps)
        kwargs["fused_back_pass"] = False  # attach_fused_backward() turns it on once the hooks exist
        return ProdigyPlusScheduleFree(groups, **kwargs)

    def _maybe_freeze(
        self, optimizer: ProdigyPlusScheduleFree, state: TrainerState, total_steps: int
    ) -> None:
        ds = [g["d"] for g in optimizer.param_groups]
        state.d_history = (state.d_history + [ds])[-(auto_freeze_window(total_steps) + 1) :]
        report = optimizer.telemetry()
        auto = self.config.optimizer.prodigy_steps == "auto"
        if auto and not report[0]["d_frozen"] and auto_freeze_due(state.d_history, state.step, total_steps):
            optimizer.freeze_d()
            report = optimizer.telemetry()
        if report[0]["d_frozen"] and not state.d_frozen_logged:
            state.d_frozen_logged = True
            self.events.write(
                "freeze",
                step=state.step,
                since_step=report[0]["d_frozen_since_step"],
                d=ds,
                rule="auto" if self.config.optimizer.prodigy_steps == "auto" else "prodigy_steps",
            )

    def _validate(self, run: _Session) -> None:
        result = run.validator.evaluate(run.adapter, run.optimizer, run.state.step)
        self.events.write("validation", **result)
        run.health.after_validation(result["step"], result["loss"], result["best_step"])

    # ------------------------------------------------------------------ live controls
    def _act_on_controls(self, run: _Session) -> None:
        """Carry out the requests `python -m trainers control` (or the UI) left since the last step.

        Process 0 reads them and tells the others, so that every process acts at the same step (a freeze,
        a checkpoint or a stop on one process alone would split the run)."""
        requests = self.controls.pending() if self.parallel.is_main else []
        plan = [{"id": r.id, "action": r.action, "stale": self.controls.is_stale(r)} for r in requests]
        if self.parallel.enabled:
            plan = json.loads(self.parallel.main_text(json.dumps(plan)) or "[]")
        files = {request.id: request for request in requests}
        for entry in plan:
            if entry["stale"]:
                status, message = "refused", "sent before this trainer started; send it again"
            else:
                status, message = self._control(entry["action"], run)
            self.events.write(
                "control",
                step=run.state.step,
                action=entry["action"],
                status=status,
                message=message,
                request=entry["id"],
            )
            if entry["id"] in files:
                self.controls.done(files[entry["id"]])

    def _control(self, action: str, run: _Session) -> tuple[str, str]:
        """(status, message) of one request, after acting on it."""
        step = run.state.step
        if action == "freeze":
            refusal = manual_freeze_refusal(run.optimizer)
            if refusal:
                return "refused", refusal
            run.optimizer.freeze_d()
            run.state.d_frozen_logged = True
            d = [g["d"] for g in run.optimizer.param_groups]
            self.events.write("freeze", step=step, since_step=step + 1, d=d, rule="manual")
            return "done", f"d frozen at {', '.join(f'{v:.3g}' for v in d)} from step {step + 1} on"
        if action == "sample":
            if not self.config.sampling.prompts:
                return "refused", "sampling.prompts is empty: add prompts to the config to sample"
            self._sample(run.adapter, run.optimizer, step)
            return "done", f"samples of step {step} written"
        if action == "checkpoint":
            return "done", f"checkpoint written: {self._checkpoint(run)}"
        if action == "stop":
            self.controls.stop_requested = True
            return "done", "stopping after this step; a checkpoint is saved"
        return "refused", f"unknown action {action!r}"

    def _refuse_controls(self, message: str) -> None:
        for request in self.controls.pending():
            self.events.write(
                "control", action=request.action, status="refused", message=message, request=request.id
            )
            self.controls.done(request)

    def _log_step(self, optimizer, state: TrainerState, loss: float, seconds: float, samples: int) -> None:
        names = self.group_names
        report = optimizer.telemetry()
        self.events.write(
            "step",
            step=state.step,
            epoch=state.epoch,
            loss=loss,
            groups=[{"name": n, "d": r["d"], "lr": r["applied_lr"]} for n, r in zip(names, report)],
            step_seconds=round(seconds, 4),
            samples=samples,  # of all processes: the global batch
            samples_per_second=round(samples / seconds, 3) if seconds > 0 else None,
            peak_memory_mb=round(_peak_memory_mb(self.device), 1),
        )
        if self.config.training.tensorboard and self.parallel.is_main:
            self._tensorboard(state.step, loss, report, names)

    def _tensorboard(self, step: int, loss: float, report, names) -> None:
        if not hasattr(self, "_writer"):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._writer.add_scalar("loss", loss, step)
        for name, entry in zip(names, report):
            self._writer.add_scalar(f"d/{name}", entry["d"], step)
            self._writer.add_scalar(f"lr/{name}", entry["applied_lr"], step)

    # ------------------------------------------------------------------ samples, checkpoints, export
    def _sample(self, adapter: ModelAdapter, optimizer: ProdigyPlusScheduleFree, step: int) -> None:
        sampling = self.config.sampling
        if not sampling.prompts:
            return
        modules = adapter.lora_modules()
        # every rank moves to x and back, so the ranks' weights stay the same; rank 0 makes the images
        optimizer.eval()  # sample from the averaged weights x, as they will be exported
        training = {name: module.training for name, module in modules.items()}
        for module in modules.values():
            module.eval()
        try:
            images = adapter.sample(sampling.prompts, sampling.seed) if self.parallel.is_main else []
        finally:
            optimizer.train()
            for name, module in modules.items():  # LoRA dropout trains on after a sample
                module.train(training[name])
        if not self.parallel.is_main:
            return
        folder = self.run_dir / "samples"
        paths = []
        for index, image in enumerate(images):
            path = folder / f"step-{step:06d}-{index:02d}.png"
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(str(path))
        self.events.write("sample", step=step, paths=paths, prompts=sampling.prompts)

    def _checkpoint(self, run: _Session) -> Path | None:
        """Save a checkpoint (rank 0; the others only check that their d is rank 0's); its folder."""
        state = run.state
        if not self.parallel.d_agrees(run.optimizer):
            raise TrainingError(
                f"Prodigy's d differs between processes at step {state.step}: their weights have drifted "
                "apart. Resume from the last checkpoint with `python -m trainers resume RUN_DIR`."
            )
        if not self.parallel.is_main:
            return None
        state.python_rng = list(run.rng.getstate())
        best_step = run.validator.best_step if run.validator is not None else None
        folder = save_checkpoint(
            self.run_dir,
            state,
            run.params,
            run.optimizer,
            run.generator,
            self.config.saving.keep_last,
            keep_step=best_step,  # pruning never takes the checkpoint `export --best` exports
        )
        self.events.write("checkpoint", step=state.step, path=str(folder))
        return folder

    def _last_checkpoint_info(self) -> dict:
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            return {"last_checkpoint": None}
        return {"last_checkpoint": str(checkpoints[-1][1]), "last_checkpoint_step": checkpoints[-1][0]}

    def _write_export_metadata(self, adapter: ModelAdapter, data: PreparedData) -> None:
        """What exported LoRA files say about this run; steps and final d are added from the checkpoint."""
        from trainers import __version__

        if not self.parallel.is_main:
            return
        config = self.config
        metadata = {
            "ss_base_model": config.model.path,
            "ss_sd_model_name": Path(config.model.path).name,
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(config.lora.rank),
            "ss_network_alpha": str(config.lora.effective_alpha),
            "ss_num_train_images": str(len(data.items)),
            "ss_resolution": f"({config.dataset.resolution}, {config.dataset.resolution})",
            "ss_optimizer": "ppsf_optim.ProdigyPlusScheduleFree",
            "ss_training_comment": f"trained with ppsf-trainer {__version__}",
            "ppsf_trainer": "ppsf-trainer",
            "ppsf_trainer_version": __version__,
            "ppsf_group_names": self.group_names,
            **adapter.export_metadata(),  # the family's own values win (Flux's ss_network_module, ...)
        }
        atomic_write_text(self.run_dir / EXPORT_METADATA_FILE, json.dumps(metadata, indent=1))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
