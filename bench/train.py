"""CPO training speed and memory: our loop (`training.loop.train`) against TRL's CPOTrainer.

Same model, same triplets, same settings on both sides: CPO sigmoid, beta 0.1, cpo_alpha 1.0,
LoRA rank 8 / alpha 16 / dropout 0 on q, k, v, o; `--batch-size` pairs per step, no
accumulation, lr 1e-4 constant without warm-up, AdamW (fused on CUDA, as ours), gradient norm
clipped to 1.0, max_length 512 (ours also max_prompt_length 256; TRL 1.16's CPO has no such
setting, and no demo triplet comes near 512 tokens), no gradient checkpointing (TRL's default
turns it on: turned off), no evaluation, no checkpoints during training (TRL: save_strategy no,
report_to none), nothing printed per step.

The triplets come from the demo corpus: the ALMA prompt over `src`, chosen and rejected the two
systems' translations ordered by the human `delta`. Both sides see the same batches in the same
order: TRL gets the rows in the order of our seeded step plan and reads them sequentially.

Each side runs in its own fresh Python process (peak RSS read as VmHWM, and on CUDA the peak
of `torch.cuda.max_memory_allocated`), `--repeats` times, alternating which side goes first.
Before each process starts, the benchmark waits (up to `--quiet-wait` s) until the machine is
idle, and it reports how many cores other processes used while each side ran.

What is compared:
- first-step loss: LoRA's B matrices start at zero, so it depends only on the base weights and
  the token ids; also the token ids themselves (ours vs TRL's `tokenize_row`);
- tokens per second: non-pad tokens of the chosen and rejected sequences (prompt included),
  counted by each side on its own batches, over the steady-state window from the end of step
  `--warm-up` to the end of step N-1 (ours saves its final checkpoint before its last step's
  callback, so the last step is left out on both sides); each window includes everything
  between steps (collation, logging, callbacks);
- peak memory.
The whole call (model loading, tokenization, training, and for ours the final saves) is
reported too, but not as the throughput.

    .venv/bin/python bench/train.py [--steps 30] [--hidden-size 256] [--layers 4] [--vocab 32000]
                                    [--preset tiny|1b] [--device auto|cpu|cuda] [--repeats 2]
                                    [--torch-threads N] [--batch-size 4]

`--preset 1b` builds a Llama-3.2-1B-shaped model with random weights (bf16, LoRA) for a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

from pipelines.demo import REPO_ROOT  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK, LORA_ALPHA = 8, 16
BETA, CPO_ALPHA, LEARNING_RATE, MAX_GRAD_NORM = 0.1, 1.0, 1e-4, 1.0
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
# Llama 3.2 1B: 1.24B parameters with tied embeddings.
PRESET_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
             "tie_word_embeddings": True, "rope_theta": 500000.0,
             "max_position_embeddings": 2048}


# ---- inputs ------------------------------------------------------------------------------------

def demo_triplets() -> list[dict]:
    """One triplet per demo row: ALMA prompt, the better system (by `delta`) as chosen."""
    from cpo_data.config import ALMA_PROMPT
    from cpo_data.select import render_prompt

    rows = []
    path = REPO_ROOT / "data/demo/demo.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        better, worse = ("system_a", "system_b") if row["delta"] > 0 else ("system_b", "system_a")
        rows.append({"id": row["id"],
                     "prompt": render_prompt(ALMA_PROMPT, row["src_lang"], row["tgt_lang"],
                                             row["src"]),
                     "chosen": row[better], "rejected": row[worse]})
    return rows


def build_model(path: Path, args: argparse.Namespace) -> dict:
    """A Llama-architecture model with random weights and the tiny BPE tokenizer.

    With `--vocab 0` and no preset this is `build_tiny_causal_lm`. Otherwise the embedding and
    LM head get the larger vocabulary while the tokenizer stays the tiny one: its ids (a few
    hundred) are valid rows, so every forward pass pays for the full-size LM head and softmax,
    which is what matters for speed and memory; only the token count per sentence differs from
    a real 128k tokenizer (the tiny BPE cuts sentences into somewhat more tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpo_data.testing import build_tiny_causal_lm, train_tokenizer

    if args.preset == "tiny" and not args.vocab:
        build_tiny_causal_lm(path, seed=args.seed, hidden_size=args.hidden_size,
                             layers=args.layers)
        model = LlamaForCausalLM.from_pretrained(path)
        config, parameters = model.config, model.num_parameters()
    else:
        tokenizer = train_tokenizer()
        if args.preset == "1b":
            shape = dict(PRESET_1B)
        else:
            shape = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": args.hidden_size * 2, "tie_word_embeddings": False,
                     "max_position_embeddings": MAX_LENGTH}
        if args.vocab:
            shape["vocab_size"] = args.vocab
        shape.setdefault("vocab_size", len(tokenizer))
        if shape["vocab_size"] < len(tokenizer):
            raise SystemExit(f"--vocab must be at least the tokenizer's {len(tokenizer)}")
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(args.seed)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        parameters = model.num_parameters()
    del model
    return {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "parameters": parameters}


def prompt_once_ceiling(model_path: Path, rows: list[dict], model_info: dict) -> dict:
    """The most the prompt once can gain on these triplets and this model shape, counted in
    multiply-adds of the weight matrices (attention scores and norms left out): two sequences
    run every prompt token through the body twice, packed once; both send the same completion
    tokens through the LM head. A body small next to its head (the tiny CPU shapes) leaves
    little to gain; a 7B body spends about 98% of its multiply-adds outside the head."""
    from transformers import AutoTokenizer

    from training.data import tokenize_triplets

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, _ = tokenize_triplets(tokenizer, rows, MAX_LENGTH, MAX_PROMPT_LENGTH)
    hidden, kv = model_info["hidden_size"], model_info["kv_heads"]
    kv_width = hidden * kv // model_info["heads"]
    body = model_info["layers"] * (2 * hidden * hidden + 2 * hidden * kv_width
                                   + 3 * hidden * model_info["intermediate_size"])
    head = hidden * model_info["vocab_size"]
    two = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    prompts = sum(e.chosen_prompt_length for e in examples)
    scored = sum(len(e.chosen_ids) - e.chosen_prompt_length + len(e.rejected_ids)
                 - e.rejected_prompt_length for e in examples)
    return {"prompt_share": round(2 * prompts / two, 3),
            "head_share_of_multiply_adds": round(scored * head / (two * body + scored * head), 3),
            "tokens_per_second_ceiling": round((two * body + scored * head)
                                               / ((two - prompts) * body + scored * head), 3)}


# ---- one side, in its own process ---------------------------------------------------------------

def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, in MiB.

    Not `getrusage(...).ru_maxrss`: on Linux a child process starts with its parent's maximum
    (it survives fork and exec), so a worker started by a parent that built a model would
    report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _window(times: list[float], tokens: list[int], warm_up: int) -> dict:
    """Tokens per second from the end of step `warm_up` to the end of step N-1."""
    last = len(times) - 1  # index of step N-1's end (times[i] ends step i+1)
    seconds = times[last - 1] - times[warm_up - 1]
    counted = sum(tokens[warm_up: last])
    return {"window_steps": f"{warm_up + 1}-{last}", "window_s": round(seconds, 4),
            "window_tokens": counted, "tokens_per_second": round(counted / seconds, 1),
            "seconds_per_step": round(seconds / (last - warm_up), 5)}


SIDES = ("ours", "ours-two", "ours-full", "trl")
"""ours: the loop as configured by default (the LM head in chunks, `logps_chunk_tokens`, and
the prompt once per pair, `prompt_once`); ours-two: chunked, chosen and rejected as two
sequences (`prompt_once: false`); ours-full: the loop before either (full logits, two
sequences); trl: TRL's CPOTrainer."""
OURS = {"ours": {}, "ours-two": {"prompt_once": False},
        "ours-full": {"prompt_once": False, "logps_chunk_tokens": None}}


def run_ours(args: argparse.Namespace, rows: list[dict], work: Path,
             side: str = "ours") -> dict:
    # What train() imports on first use, imported here as TRL's side imports its libraries
    # before its clock starts: the whole call then counts the same things on both sides.
    import peft  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from training.config import (
        CheckpointSettings,
        EvalConfig,
        LengthSettings,
        LoraSettings,
        OptimizerSettings,
        ScheduleSettings,
        TrainConfig,
    )
    from training.loop import train

    after_imports = _rss_mb("VmRSS")
    device = _device(args.device)
    config = TrainConfig(
        model=args.model, loss="cpo", loss_type="sigmoid", beta=BETA, cpo_alpha=CPO_ALPHA,
        finetune="lora", lora=LoraSettings(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0,
                                           target_modules=TARGETS),
        optimizer=OptimizerSettings(learning_rate=LEARNING_RATE, weight_decay=0.0,
                                    max_grad_norm=MAX_GRAD_NORM),
        schedule=ScheduleSettings(lr_scheduler="constant", warmup_ratio=0.0,
                                  max_steps=args.steps),
        lengths=LengthSettings(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH),
        batch_size=args.batch_size, gradient_accumulation_steps=1, precision=args.precision,
        device=device, seed=args.seed, **OURS[side],
        checkpoints=CheckpointSettings(every_steps=0, resume=False), eval=EvalConfig(held_out=0))
    ends: list[float] = []

    def on_step(step: int, metrics: dict) -> None:
        ends.append(time.perf_counter())

    started = time.perf_counter()
    train(config, rows, work / "run", on_step=on_step, progress=False)
    whole = time.perf_counter() - started
    lines = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    first, window = lines[0], lines[args.warm_up: len(lines) - 1]
    return {
        "first_step": {k: first[k] for k in ("loss", "nll_loss", "logps/chosen",
                                             "logps/rejected", "rewards/margins")},
        "losses": [line["loss"] for line in lines],
        "tokens": [line["tokens"] for line in lines],
        **_window(ends, [line["tokens"] for line in lines], args.warm_up),
        # The loop's own figure over the same steps: its step clock stops before the metrics
        # line is written and the callback runs.
        "loop_reported_tokens_per_second": round(
            sum(line["tokens"] for line in window)
            / sum(line["tokens"] / line["tokens_per_second"] for line in window), 1),
        "whole_call_s": round(whole, 3),
        "after_last_step_s": round(started + whole - ends[-1], 3),
        "rss_after_imports_mb": round(after_imports, 1),
    }


def run_trl(args: argparse.Namespace, rows: list[dict], work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from training.data import tokenize_triplets
    from training.loop import step_plan

    after_imports = _rss_mb("VmRSS")
    device = _device(args.device)
    # Our loop's batches, in its order: TRL reads them front to back.
    plan, _ = step_plan(len(rows), args.batch_size, 1, 1, args.steps, args.seed)
    if any(len(micro) != args.batch_size for step in plan for micro in step):
        raise SystemExit("the step plan has a short batch (epoch end): pick --steps so that "
                         "every batch is full")
    ordered = [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")}
               for step in plan for micro in step for i in micro]

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.first_logs: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # as our loop does at the end of each step
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 1 and "loss" in (logs or {}):
                self.first_logs = dict(logs)

    class PlannedCPOTrainer(CPOTrainer):
        """CPOTrainer reading the rows in the given order and keeping each step's loss and
        non-pad token count as tensors (no extra synchronisation)."""

        losses: list[torch.Tensor]
        tokens: list[torch.Tensor]

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None
                                     else train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(loss.detach())
            self.tokens.append(inputs["chosen_attention_mask"].sum()
                               + inputs["rejected_attention_mask"].sum())
            return loss

    started = time.perf_counter()
    bf16 = args.precision == "bf16"
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cpo_args = CPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
        loss_type="sigmoid", beta=BETA, cpo_alpha=CPO_ALPHA, max_length=MAX_LENGTH,
        gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=device == "cpu",
        seed=args.seed, data_seed=args.seed, report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0)
    recorder = Recorder()
    trainer = PlannedCPOTrainer(
        model=model, args=cpo_args, train_dataset=Dataset.from_list(ordered),
        processing_class=tokenizer, callbacks=[recorder],
        peft_config=LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                               target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)  # ours prints nothing either (progress=False)
    trainer.losses, trainer.tokens = [], []
    setup = time.perf_counter() - started

    # Token ids: TRL's tokenize_row against ours, example by example (outside the timing).
    ours, _ = tokenize_triplets(tokenizer, ordered, MAX_LENGTH, MAX_PROMPT_LENGTH)
    differ = []
    for n, (mine, theirs) in enumerate(zip(ours, trainer.train_dataset, strict=True)):
        same = (mine.chosen_ids == theirs["chosen_input_ids"]
                and mine.rejected_ids == theirs["rejected_input_ids"]
                and mine.chosen_prompt_length == theirs["chosen_labels"].count(-100)
                and mine.rejected_prompt_length == theirs["rejected_labels"].count(-100))
        if not same:
            differ.append(n)

    started_train = time.perf_counter()
    trainer.train()
    whole = setup + time.perf_counter() - started_train
    losses = [float(x) for x in trainer.losses]
    tokens = [int(x) for x in trainer.tokens]
    first = recorder.first_logs
    return {
        "first_step": {"loss": losses[0], "nll_loss": first.get("nll_loss"),
                       "logps/chosen": first.get("logps/chosen"),
                       "logps/rejected": first.get("logps/rejected"),
                       "rewards/margins": first.get("rewards/margins")},
        "losses": losses, "tokens": tokens,
        **_window(recorder.ends, tokens, args.warm_up),
        "whole_call_s": round(whole, 3),
        "token_ids_differ": len(differ), "token_ids_differ_first": differ[:5],
        "longest_sequence_tokens": max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in ours),
        "rss_after_imports_mb": round(after_imports, 1),
    }


def worker(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as folder:
        if args.worker == "trl":
            result = run_trl(args, rows, Path(folder))
        else:
            result = run_ours(args, rows, Path(folder), args.worker)
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    if _device(args.device).startswith("cuda"):
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(args.out).write_text(json.dumps(result))


# ---- the comparison -----------------------------------------------------------------------------

def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until the machine's other processes use under a quarter of one
    core over a second: on 2 cores, another process's burst stalls torch's second thread."""
    import psutil

    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if psutil.cpu_percent(interval=1.0) * psutil.cpu_count() / 100 < 0.25:
            break
    return time.perf_counter() - started


def spawn(side: str, args: argparse.Namespace, model: Path, rows: Path, out: Path) -> dict:
    import psutil

    waited = wait_for_quiet(args.quiet_wait)
    before = psutil.cpu_times()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, __file__, "--worker", side, "--model", str(model),
               "--rows", str(rows), "--out", str(out), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--device", args.device,
               "--precision", args.precision, "--seed", str(args.seed),
               "--warm-up", str(args.warm_up), "--torch-threads", str(args.torch_threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {side} worker failed ({done.returncode})")
    seconds = time.perf_counter() - started
    after = psutil.cpu_times()
    mine = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = sum(after[i] - before[i] for i in range(len(after)) if after._fields[i] not in
               ("idle", "iowait", "guest", "guest_nice"))
    own = (mine.ru_utime - children.ru_utime) + (mine.ru_stime - children.ru_stime)
    result = json.loads(out.read_text())
    # CPU seconds other processes used while the worker ran, per second of the worker's life.
    result["other_cpu_cores"] = round(max(busy - own, 0.0) / seconds, 2)
    result["waited_for_quiet_s"] = round(waited, 1)
    return result


def compare_ours(chunked: dict, full: dict) -> dict:
    """One of our paths against another: the same losses, and the speed and memory ratios."""
    compared = {
        "max_abs_loss_diff_all_steps": max(abs(a - b) for a, b in
                                           zip(chunked["losses"], full["losses"], strict=True)),
        "tokens_per_second_ratio": round(chunked["tokens_per_second"]
                                         / full["tokens_per_second"], 3),
        "peak_rss_ratio": round(chunked["peak_rss_mb"] / full["peak_rss_mb"], 3),
    }
    if "peak_cuda_allocated_mb" in chunked:
        compared["peak_cuda_ratio"] = round(chunked["peak_cuda_allocated_mb"]
                                            / full["peak_cuda_allocated_mb"], 3)
    return compared


def compare(ours: dict, trl: dict, precision: str) -> dict:
    mine, theirs = ours["first_step"]["loss"], trl["first_step"]["loss"]
    relative = abs(mine - theirs) / abs(theirs)
    compared = {
        "first_loss_ours": mine, "first_loss_trl": theirs,
        "first_loss_abs_diff": abs(mine - theirs), "first_loss_rel_diff": relative,
        # float32 rounding of different reduction orders, or bf16's ~3 significant digits
        "first_loss_agrees": relative < (1e-5 if precision == "fp32" else 1e-2),
        "max_abs_loss_diff_all_steps": max(abs(a - b) for a, b in
                                           zip(ours["losses"], trl["losses"], strict=True)),
        "same_tokens_every_step": ours["tokens"] == trl["tokens"],
        "tokens_per_second_ratio": round(ours["tokens_per_second"]
                                         / trl["tokens_per_second"], 3),
        "peak_rss_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
        "whole_call_ratio": round(trl["whole_call_s"] / ours["whole_call_s"], 3),
    }
    if "peak_cuda_allocated_mb" in ours:
        compared["peak_cuda_ratio"] = round(ours["peak_cuda_allocated_mb"]
                                            / trl["peak_cuda_allocated_mb"], 3)
    return compared


def table(runs: list[dict]) -> str:
    header = (f"{'run':>3} {'side':<5} {'tok/s':>9} {'s/step':>8} {'peak RSS MB':>12} "
              f"{'after imports':>14} {'whole s':>8} {'first loss':>12} {'other cpu':>9}")
    lines = [header, "-" * len(header)]
    for number, run in enumerate(runs, 1):
        for side in (side for side in SIDES if side in run):
            r = run[side]
            lines.append(f"{number:>3} {side:<5} {r['tokens_per_second']:>9.1f} "
                         f"{r['seconds_per_step']:>8.4f} {r['peak_rss_mb']:>12.1f} "
                         f"{r['rss_after_imports_mb']:>14.1f} {r['whole_call_s']:>8.2f} "
                         f"{r['first_step']['loss']:>12.6f} {r['other_cpu_cores']:>9.2f}")
        c = run["compare"]
        cuda = f", CUDA peak {c['peak_cuda_ratio']:.3f}x" if "peak_cuda_ratio" in c else ""
        lines.append(f"    ours/TRL: tokens/s {c['tokens_per_second_ratio']:.3f}x, peak RSS "
                     f"{c['peak_rss_ratio']:.3f}x{cuda}; whole call TRL/ours "
                     f"{c['whole_call_ratio']:.3f}x; first loss |diff| "
                     f"{c['first_loss_abs_diff']:.2e} (rel {c['first_loss_rel_diff']:.2e})")
        for key, label in (("prompt_once_vs_two", "ours/ours-two"),
                           ("chunked_vs_full", "ours-two/ours-full")):
            if key in run:
                c = run[key]
                cuda = (f", CUDA peak {c['peak_cuda_ratio']:.3f}x" if "peak_cuda_ratio" in c
                        else "")
                lines.append(f"    {label}: tokens/s {c['tokens_per_second_ratio']:.3f}x, "
                             f"peak RSS {c['peak_rss_ratio']:.3f}x{cuda}; max |loss diff| "
                             f"{c['max_abs_loss_diff_all_steps']:.2e}")
        if "compare_full" in run:
            c = run["compare_full"]
            lines.append(f"    ours-full/TRL: tokens/s {c['tokens_per_second_ratio']:.3f}x, "
                         f"peak RSS {c['peak_rss_ratio']:.3f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--hidden-size", type=int, default=256, help="tiny model width")
    parser.add_argument("--layers", type=int, default=4, help="tiny model depth")
    # Llama 2's vocabulary (so ALMA's) by default: with the tiny tokenizer's 600 rows the
    # output layer, where the two loops differ, is a rounding error of the step.
    parser.add_argument("--vocab", type=int, default=32000,
                        help="model vocabulary rows (0: the tiny tokenizer's own size)")
    parser.add_argument("--preset", choices=("tiny", "1b"), default="tiny",
                        help="1b: Llama-3.2-1B shape, random weights (for a GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: the first visible GPU (pick it with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: fp32, bf16 for --preset 1b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warm-up", type=int, default=1,
                        help="steps left out of the throughput window at the start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads of each worker; 0: torch's default")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds to wait at most for an idle machine before each side")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which loops to run (TRL and ours always)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision is None:
        args.precision = "bf16" if args.preset == "1b" else "fp32"
    if not 1 <= args.warm_up <= args.steps - 3:
        raise SystemExit("--warm-up must leave at least two steps before step N")
    if args.worker:
        worker(args)
        return

    rows = demo_triplets()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_info = build_model(folder / "model", args)
        ceiling = prompt_once_ceiling(folder / "model", rows, model_info)
        rows_path = folder / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        runs = []
        sides = [side for side in SIDES if side in {"ours", "trl", *args.sides}]
        for number in range(args.repeats):
            # Each repeat starts with another side, so no side always runs first.
            order = sides[number % len(sides):] + sides[:number % len(sides)]
            run = {"order": "-".join(order)}
            for side in order:
                run[side] = spawn(side, args, folder / "model", rows_path,
                                  folder / f"{side}-{number}.json")
            run["compare"] = compare(run["ours"], run["trl"], args.precision)
            if "ours-full" in run:
                run["compare_full"] = compare(run["ours-full"], run["trl"], args.precision)
            if "ours-two" in run:
                run["prompt_once_vs_two"] = compare_ours(run["ours"], run["ours-two"])
                if "ours-full" in run:
                    run["chunked_vs_full"] = compare_ours(run["ours-two"], run["ours-full"])
            runs.append(run)

    print(table(runs), file=sys.stderr)
    for run in runs:  # per-step lists are for the comparison only
        for side in (side for side in SIDES if side in run):
            del run[side]["losses"], run[side]["tokens"]
    ratios = [run["compare"]["tokens_per_second_ratio"] for run in runs]
    rss = [run["compare"]["peak_rss_ratio"] for run in runs]
    print(json.dumps({
        "benchmark": "train", "model": model_info, "preset": args.preset,
        "triplets": len(rows), "steps": args.steps, "batch_pairs": args.batch_size,
        "precision": args.precision, "device": _device(args.device), "warm_up": args.warm_up,
        "runs": runs, "tokens_per_second_ratios": ratios, "peak_rss_ratios": rss,
        "prompt_once_ceiling": ceiling,
        "goals": {"tokens_per_second_ratio": ">= 2.5 (vocabulary 128256)",
                  "peak_memory_ratio": "<= 0.35 (vocabulary 128256)"},
        "torch_threads": args.torch_threads or torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
    }, indent=1))


if __name__ == "__main__":
    main()
