"""The training loop, top to bottom: set up, train, save.

`train(config, rows, run_dir)` trains the configured model on triplet rows (`prompt`, `chosen`,
`rejected`) and leaves in `run_dir`:

- `checkpoint-{step}/`: weights (adapter or full), tokenizer, optimizer, scheduler and RNG
  state, every `checkpoints.every_steps` and at the end; a rerun with `checkpoints.resume`
  continues from the newest exactly as if it had not stopped (same data order, same dropout,
  same schedule);
- `final/`: the trained adapter (or weights) and tokenizer, ready for `from_pretrained`;
- `metrics.jsonl`: one line per optimizer step (and per evaluation) under the names TRL
  users know: `loss`, `nll_loss`, `rewards/*`, `logps/*`, plus `learning_rate`, `grad_norm`,
  `tokens_per_second`, `peak_memory_mb`; the same lines go to the dashboards `report_to`
  names (`training/reporting.py`; TensorBoard's event files in `tensorboard/`).

Launched as several processes (`torchrun`, `accelerate launch`), each trains on its share of
every step's pairs and the gradients are added up (`training/distributed.py`): a step sees the
same pairs and gives the same loss as one process would. Metrics are over the whole step;
rank 0 alone writes the files above and shows progress.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import checkpoint as ckpt
from training import distributed, reporting
from training.config import TrainConfig, resume_settings
from training.data import TokenizeReport, collate, tokenize_triplets
from training.errors import TrainingDiverged, TrainingError
from training.forward import (
    accepts_logits_to_keep,
    forward_logps,
    head_chunk,
    nll_covers_prompt,
    nll_tokens,
    preference_loss,
    prompt_once,
    reference_logps,
)
from training.model import (
    autocast_dtype,
    load_model,
    load_tokenizer,
    logps_dtype,
    peak_memory_mb,
)

log = logging.getLogger("cpo_data.training")

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
@dataclass
class TrainResult:
    run_dir: str
    model_dir: str
    """The trained adapter or model (`final/`)."""
    steps: int
    resumed_from_step: int
    """0 for a fresh run."""
    train_rows: int
    held_out_rows: int
    truncated: int
    """Training examples cut by the truncation rule."""
    left_out: dict[str, int]
    """Triplets (training and held-out) that tokenizing left out, per reason."""
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Things the user should know (e.g. EOS used as the pad token)."""


StepCallback = Callable[[int, dict[str, float]], None]


def split_held_out(rows: Sequence[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded pick of `count` rows to hold out; the rest train, in their order."""
    if count == 0:
        return list(rows), []
    if count >= len(rows):
        raise TrainingError(f"eval.held_out: {count} held-out triplets leave none of the "
                            f"{len(rows)} to train on")
    picked = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
                 [:count].tolist())
    return ([r for i, r in enumerate(rows) if i not in picked],
            [r for i, r in enumerate(rows) if i in picked])


def step_plan(examples: int, batch_size: int, accumulation: int, epochs: int,
              max_steps: int, seed: int, processes: int = 1) -> tuple[list[list[list[int]]], int]:
    """Example indices of every micro-batch of every optimizer step, and steps per epoch.

    A step holds `batch_size x accumulation x processes` pairs; the processes of a
    data-parallel run share them out (`distributed.my_share`). Each epoch is its own seeded
    permutation, so the plan is the same on every run and every process, and a resumed run
    picks up the very batches it would have seen."""
    plan: list[list[list[int]]] = []
    per_epoch = 0
    epoch = 0
    while (len(plan) < max_steps) if max_steps else (epoch < epochs):
        order = torch.randperm(examples,
                               generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i: i + batch_size] for i in range(0, examples, batch_size)]
        per_step = accumulation * processes
        steps = [micro[i: i + per_step] for i in range(0, len(micro), per_step)]
        per_epoch = len(steps)
        plan.extend(steps)
        epoch += 1
    return (plan[:max_steps] if max_steps else plan), per_epoch


def _left_out(train: TokenizeReport, held: TokenizeReport, notes: list[str]) -> dict[str, int]:
    """Left-out pairs of both parts, per reason; says so in the log and in `notes`."""
    counts = {reason: train.left_out.get(reason, 0) + held.left_out.get(reason, 0)
              for reason in train.left_out.keys() | held.left_out.keys()}
    if counts:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        ids = ", ".join((train.left_out_ids + held.left_out_ids)[:5])
        notes.append(f"{sum(counts.values())} triplet(s) left out because a completion has no "
                     f"tokens of its own ({reasons}; e.g. {ids})")
        log.warning(notes[-1])
    return counts


def _resume_point(config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, after checking it was made by the same settings."""
    found = ckpt.checkpoints(run_dir)
    if not found:
        return None
    if not config.checkpoints.resume:
        if distributed.is_main():  # the others never read the run folder when starting over
            log.warning("%s: resume is off: starting over, deleting %d checkpoint(s)", run_dir,
                        len(found))
            for folder in found:
                shutil.rmtree(folder)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        return None
    saved = ckpt.read_state(found[-1]).get("config", {})
    current = _resume_settings(config, distributed.world_size())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise TrainingError(
            f"{found[-1]}: was trained with other settings ({', '.join(changed)}); resume it "
            "with the same settings, set train.checkpoints.resume: false to start over, or pick "
            "another output_dir")
    return found[-1]


def _resume_settings(config: TrainConfig, processes: int) -> dict[str, Any]:
    settings = resume_settings(config)  # the fields not marked RESUME_FREE
    if processes > 1:  # a step's pairs are batch_size x accumulation x processes
        settings["processes"] = processes
    return json.loads(json.dumps(settings))  # tuples as lists, as the saved JSON has them


def _keep_metrics_until(path: Path, step: int, total_steps: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from (and the closing
    evaluation, at the last step, which the resumed run writes again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        closing_eval = "eval/loss" in record and record["step"] == total_steps
        if record["step"] <= step and not closing_eval:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def evaluate_preferences(model, config: TrainConfig, examples, pad_id: int,
                         device: torch.device, half: torch.dtype | None,
                         trim: bool, chunk: int | None = None,
                         packed: bool = False) -> dict[str, float]:
    """Loss and reward metrics of held-out triplets, named `eval/...`.

    Several processes each measure a contiguous share and the metrics cover all of them."""
    parts, references = [], []
    first, stop = distributed.share(len(examples), distributed.rank(), distributed.world_size())
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(device, half):
        for start in range(first, stop, config.eval.batch_size):
            end = min(start + config.eval.batch_size, stop)
            batch = _to(collate(examples[start: end], pad_id), device)
            parts.append(forward_logps(model, batch, nll_covers_prompt(config), trim, chunk,
                                       packed))
            if config.loss == "dpo":
                references.append(reference_logps(model, batch, trim, chunk, packed))
    model.train(was_training)
    dtype = logps_dtype(config)
    logps = distributed.gather_logps(parts, first, len(examples), device, dtype)
    reference = (distributed.gather_logps(references, first, len(examples), device, dtype)
                 if config.loss == "dpo" else None)
    metrics = preference_loss(config, logps, reference).metrics
    return {f"eval/{name}": value for name, value in metrics.items()}


def _autocast(device: torch.device, half: torch.dtype | None):
    return torch.autocast(device.type, dtype=half) if half is not None else nullcontext()


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(config: TrainConfig, rows: Sequence[dict], run_dir: str | Path, *,
          on_step: StepCallback | None = None, progress: bool = True,
          manifest: dict[str, Any] | None = None) -> TrainResult:
    """Train on triplet rows; see the module docstring for what lands in `run_dir`.

    `on_step(step, metrics)` runs after every optimizer step (the flow reports progress with
    it); `manifest` is stored with each checkpoint (e.g. the dataset version)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler, set_seed

    # ---- set up -------------------------------------------------------------------------
    if not rows:
        raise TrainingError("the dataset has no triplets to train on")
    reporting.check_backends(config.report_to)  # a missing extra stops before any loading
    run_dir = Path(run_dir)
    device = distributed.init(config.device)  # joins the process group when launched
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0  # writes the run folder; the other processes only read it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    half = autocast_dtype(config, device)
    resume_from = _resume_point(config, run_dir)
    set_seed(config.seed)  # before the adapter's random initialisation

    tokenizer, pad_note = load_tokenizer(config)
    train_rows, held_rows = split_held_out(rows, config.eval.held_out, config.seed)
    examples, report = tokenize_triplets(tokenizer, train_rows, config.lengths.max_length,
                                         config.lengths.max_prompt_length)
    held_examples, held_report = tokenize_triplets(tokenizer, held_rows,
                                                   config.lengths.max_length,
                                                   config.lengths.max_prompt_length)
    if report.truncated:
        log.warning("%d of %d training triplets were longer than max_length %d and were cut "
                    "(e.g. %s)", report.truncated, report.examples, config.lengths.max_length,
                    ", ".join(report.truncated_ids[:5]))
    notes = [pad_note] if pad_note else []
    left_out = _left_out(report, held_report, notes)
    if not examples:
        raise TrainingError(f"none of the {len(train_rows)} training triplets is left to train "
                            f"on: {notes[-1]}")

    model = load_model(config, device, half, resume_from)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(trainable)
    if world > 1:  # each process its own dropout draws, as one process's would differ by pair
        set_seed(config.seed + rank)
    optimizer = torch.optim.AdamW(trainable, lr=config.optimizer.learning_rate,
                                  weight_decay=config.optimizer.weight_decay,
                                  fused=device.type == "cuda")
    plan, steps_per_epoch = step_plan(len(examples), config.batch_size,
                                      config.gradient_accumulation_steps,
                                      config.schedule.epochs, config.schedule.max_steps,
                                      config.seed, world)
    total_steps = len(plan)
    # transformers' "constant" ignores the warm-up; ours warms up like the others.
    schedule = config.schedule
    kind = "constant_with_warmup" if schedule.lr_scheduler == "constant" else schedule.lr_scheduler
    scheduler = get_scheduler(kind, optimizer,
                              num_warmup_steps=math.ceil(schedule.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    start = 0
    if resume_from is not None:
        ckpt.load_training_state(resume_from, optimizer, scheduler, rank)
        start = ckpt.read_state(resume_from)["step"]
        log.info("resuming %s from step %d (%s)", run_dir, start, resume_from.name)
    metrics_path = run_dir / METRICS_FILE
    if main:
        _keep_metrics_until(metrics_path, start, total_steps)

    trim = accepts_logits_to_keep(model)
    chunk = head_chunk(model, config)
    packed = prompt_once(model, config)
    dtype = logps_dtype(config)
    full_nll = nll_covers_prompt(config)
    pad_id = tokenizer.pad_token_id
    checkpoint_state = {"config": _resume_settings(config, world), **(manifest or {})}
    last_saved = (start, resume_from) if resume_from is not None else None  # (step, folder)
    metrics: dict[str, float] = {}
    dashboards = reporting.open_reporters(config, run_dir, start, main)  # train.report_to

    def save(step: int) -> tuple[int, Path]:
        # Every process's random-number state, so that a resumed run draws the same dropout.
        rng_states = distributed.gather_objects(ckpt.rng_state())
        folder = ckpt.checkpoint_dir(run_dir, step)
        if main:
            ckpt.save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler,
                                 checkpoint_state, config.checkpoints.keep, rng_states)
        distributed.barrier()  # no process goes on while the checkpoint is half written
        return step, folder

    def write_metrics(line: dict[str, Any]) -> None:
        if main:
            with metrics_path.open("a") as out:
                out.write(json.dumps(line) + "\n")
            dashboards.log(line)

    # ---- train --------------------------------------------------------------------------
    # Closed however the loop ends, so that a diverged or interrupted run's last steps
    # reach the dashboards too.
    with dashboards:
        bar = tqdm(total=total_steps, initial=start, desc="training", unit="step",
                   disable=not (progress and main))
        for step in range(start, total_steps):
            started = time.perf_counter()
            first, micro_batches = distributed.my_share(plan[step], config.batch_size)
            batches = [collate([examples[i] for i in micro], pad_id) for micro in micro_batches]
            # The step's totals over all processes, so each micro-batch's loss is its share of
            # the step's mean and the shares' gradients add up to the step's gradient.
            pairs = sum(len(micro) for micro in plan[step])
            token_total, tokens = (int(n) for n in distributed.reduce_numbers(
                [sum(nll_tokens(batch, full_nll) for batch in batches),
                 sum(int(batch["attention_mask"].sum()) for batch in batches)], device))
            parts, references = [], []
            for batch in batches:
                batch = _to(batch, device)
                with _autocast(device, half):
                    logps = forward_logps(model, batch, full_nll, trim, chunk, packed)
                    reference = (reference_logps(model, batch, trim, chunk, packed)
                                 if config.loss == "dpo" else None)
                    loss = preference_loss(config, logps, reference, pairs, token_total,
                                           with_metrics=False).loss
                loss.backward()
                parts.append(logps.detach())
                if reference is not None:
                    references.append(reference)
            distributed.sum_gradients(trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, config.optimizer.max_grad_norm or math.inf)
            with torch.no_grad():  # over the whole step's pairs, from every process
                step_logps = distributed.gather_logps(parts, first, pairs, device, dtype)
                step_reference = (distributed.gather_logps(references, first, pairs, device, dtype)
                                  if config.loss == "dpo" else None)
                metrics = preference_loss(config, step_logps, step_reference).metrics
            if not (math.isfinite(metrics["loss"]) and math.isfinite(float(grad_norm))):
                bar.close()
                # No update was made: the weights are those after the previous step. Keep them.
                _, good = last_saved if last_saved and last_saved[0] == step else save(step)
                bad = ("loss", metrics["loss"]) if not math.isfinite(metrics["loss"]) \
                    else ("gradient norm", float(grad_norm))
                raise TrainingDiverged(
                    f"{bad[0]} became {bad[1]} at step {step + 1}: training stopped; the last good "
                    f"weights (after step {step}) are in {good}", step + 1, good)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            # The largest process's: the one closest to running out of memory.
            peak, = distributed.reduce_numbers([peak_memory_mb(device)], device, op="max")
            metrics.update({
                "learning_rate": learning_rate, "grad_norm": float(grad_norm), "tokens": tokens,
                "tokens_per_second": tokens / seconds, "peak_memory_mb": peak,
            })
            write_metrics({"step": step + 1, "epoch": (step + 1) / steps_per_epoch, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                            acc=f"{metrics['rewards/accuracies']:.2f}", lr=f"{learning_rate:.2e}")
            done = step + 1
            if done == total_steps or (config.checkpoints.every_steps
                                        and done % config.checkpoints.every_steps == 0):
                last_saved = save(done)
            if held_examples and config.eval.every_steps and done % config.eval.every_steps == 0 \
                    and done != total_steps:
                write_metrics({"step": done, **evaluate_preferences(
                    model, config, held_examples, pad_id, device, half, trim, chunk, packed)})
            if on_step is not None:
                on_step(done, metrics)
        bar.close()

        # ---- save -----------------------------------------------------------------------
        if last_saved is None or last_saved[0] != total_steps:
            save(total_steps)
        eval_metrics = {}
        if held_examples:
            eval_metrics = evaluate_preferences(model, config, held_examples, pad_id, device, half,
                                                trim, chunk, packed)
            write_metrics({"step": total_steps, **eval_metrics})
    final = run_dir / FINAL_DIR
    if main:
        ckpt.save_model(final, model, tokenizer)
    distributed.barrier()  # every process returns with the run complete on disk
    return TrainResult(
        run_dir=str(run_dir), model_dir=str(final), steps=total_steps,
        resumed_from_step=start, train_rows=len(train_rows), held_out_rows=len(held_rows),
        truncated=report.truncated, left_out=left_out, last_metrics=metrics,
        eval_metrics=eval_metrics, notes=notes)
