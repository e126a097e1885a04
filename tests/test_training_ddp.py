"""Data-parallel training: two CPU processes (gloo) started by torchrun through the real entry
point (`-m training`) train exactly as one process with the same global batch, only rank 0
writes, and a two-process run resumes exactly.

Run as a script, this file is one torchrun worker: it forbids ranks other than 0 every change
to the files under the test's folder, then runs `python -m training`'s code unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

ROOT_ENV = "CPO_DDP_TEST_ROOT"
MARK_ENV = "CPO_DDP_TEST_LAUNCH"
TIMING = ("tokens_per_second", "peak_memory_mb")
STEP_PAIRS = 4  # the global batch: 1 pair x 2 micro-batches x 2 processes, or 4 x 1 x 1
# Two processes and one compute the same step with other batch shapes, so in another summation
# order: in float64 (`precision: fp64`) that is a few thousand roundings of 1.1e-16 deep in
# this tiny model, n * u near 1e-12 relative on any CPU (float32's ~1e-6 depends on the CPU's
# kernels). A missing all-reduce or a per-rank normaliser moves the loss by more than 1e-3.
SAME = 1e-10
# Adam turns rounding noise in a gradient that is zero in exact arithmetic (~1e-17) into a
# weight change of at most lr * noise / eps = 1e-2 * 1e-17 / 1e-8 = 1e-11.
SAME_WEIGHTS = 1e-9


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A tiny model and a published version of 12 triplets (3 held out, so 9 train: steps of
    4, 4 and 1 pairs; in the last, rank 1 has none). Chosen completions have 1 to 10 words,
    so the two processes' shares of a step hold different numbers of tokens."""
    from cpo_data import store
    from cpo_data.testing import build_tiny_causal_lm, sample_triplets

    root = tmp_path_factory.mktemp("ddp")
    build_tiny_causal_lm(root / "model")
    table = sample_triplets(rows_per_pair=6)
    rows = table.to_pylist()
    for number, row in enumerate(rows):
        row["chosen"] = " ".join(["good translation"] * (1 + 3 * (number % 4)))
    store.publish_triplets(pa.Table.from_pylist(rows, schema=table.schema),
                           str(root / "store"), "mt",
                           provenance={"source_fingerprint": "f1" * 32})
    return root


def write_config(root: Path, name: str, **changes) -> Path:
    from cpo_data.store import dataset_uri
    from tests.conftest import nest_train_settings

    train = dict(model=str(root / "model"), dataset=dataset_uri(str(root / "store"), "mt"),
                 output_dir=str(root / name), device="cpu", finetune="full", loss="cpo",
                 batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-2,
                 lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0, seed=0,
                 precision="fp64", eval={"held_out": 3, "every_steps": 2, "batch_size": 2})
    train.update(changes)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train": nest_train_settings(train)}))
    return path


def launch(config: Path, root: Path, processes: int = 2) -> str:
    """`torchrun --standalone --nproc_per_node N THIS_FILE CONFIG`; its output. Every process
    it started is gone when this returns, whatever happened."""
    from tests.conftest import processes_with_env

    mark = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", ROOT_ENV: str(root), MARK_ENV: mark}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), __file__, str(config)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    finally:
        left = processes_with_env(f"{MARK_ENV}={mark}")
        for pid in left:  # a hung worker: ours (it carries this launch's mark)
            os.kill(int(pid), signal.SIGKILL)
    assert not left, f"processes outlived the launch: {left}"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def run_folder(output_dir: Path) -> Path:
    folder, = (p for p in output_dir.iterdir() if p.is_dir())  # {output_dir}/{version}
    return folder


def metric_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def two_and_one(published) -> tuple[Path, Path]:
    """The same training, as 2 processes x 2 micro-batches of 1 pair (torchrun) and as one
    process with one micro-batch of 4 pairs (in this process): run folders (two, one)."""
    from training.config import load_train_config
    from training.run import run_training

    config = write_config(published, "two")
    launch(config, published)
    one = dataclasses.replace(load_train_config(config), output_dir=str(published / "one"),
                              batch_size=4, gradient_accumulation_steps=1)
    run_training(one, progress=False)
    return run_folder(published / "two"), run_folder(published / "one")


@pytest.mark.slow
def test_the_processes_shares_hold_different_token_counts(published):
    """The premise of the next test: a per-process token mean would weigh the shares wrongly."""
    from transformers import AutoTokenizer

    from training.config import load_train_config
    from training.distributed import share
    from training.loop import split_held_out, step_plan
    from training.run import load_dataset

    config = load_train_config(write_config(published, "premise"))
    _, rows = load_dataset(config)
    train_rows, _ = split_held_out(rows, config.eval.held_out, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    completion = [len(tokenizer(r["chosen"], add_special_tokens=False)["input_ids"])
                  for r in train_rows]
    plan, _ = step_plan(len(train_rows), 1, 2, 1, 0, config.seed, processes=2)
    assert [sum(map(len, step)) for step in plan] == [4, 4, 1]
    for step in plan[:2]:
        pairs = [i for micro in step for i in micro]
        tokens = [sum(completion[i] for i in pairs[slice(*share(len(pairs), rank, 2))])
                  for rank in (0, 1)]
        assert tokens[0] != tokens[1], tokens


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(two_and_one):
    two, one = two_and_one
    lines_two, lines_one = metric_lines(two), metric_lines(one)
    assert [(m["step"], "eval/loss" in m) for m in lines_two] == \
        [(1, False), (2, False), (2, True), (3, False), (3, True)]
    for a, b in zip(lines_one, lines_two, strict=True):
        assert a.keys() == b.keys()
        assert a["step"] == b["step"] and a.get("tokens") == b.get("tokens")
        for key in a.keys() - {"step", "tokens", *TIMING}:
            # abs: metrics near 0 are sums of terms of ~50 nats: n * u * 50 stays below 1e-10
            assert b[key] == pytest.approx(a[key], rel=SAME, abs=SAME), (a["step"], key)
    # Full fine-tuning without clipping: every weight carries the exact summed gradient.
    from safetensors.torch import load_file

    weights_one = load_file(one / "final" / "model.safetensors")
    weights_two = load_file(two / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    initial = load_file(one.parent.parent / "model" / "model.safetensors")
    for name, value in weights_one.items():
        assert not torch.equal(value, initial[name].to(value.dtype)), f"{name} did not train"
        assert value.dtype == torch.float64
        assert torch.allclose(weights_two[name], value, atol=SAME_WEIGHTS, rtol=0), name


@pytest.mark.slow
def test_only_rank_0_writes(two_and_one, published):
    """Rank 1 ran with every write under the test folder refused (and its own probe write was
    refused), yet the run succeeded: its folder holds what a one-process run's holds, plus
    rank 1's random-number state, which rank 0 saved."""
    two, one = two_and_one
    assert not (published / "rank-1-probe").exists()
    assert files(two) == files(one) | {"checkpoint-3/rng_state_1.pt"}
    manifest = json.loads((two / "run_manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["model_dir"] == str(two / "final")


@pytest.mark.slow
def test_one_process_refuses_to_resume_a_two_process_run(two_and_one, published):
    """Its steps would hold half the pairs: another plan, another schedule."""
    from training.config import load_train_config
    from training.loop import TrainingError
    from training.run import load_dataset, train_on

    two, _ = two_and_one
    before = {p: p.stat().st_mtime_ns for p in two.rglob("*")}
    config = load_train_config(published / "two.yaml")
    manifest, rows = load_dataset(config)
    with pytest.raises(TrainingError, match=r"checkpoint-3: was trained with other settings "
                       r"\(processes\)"):
        train_on(config, manifest, rows, progress=False)
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*")} == before


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(published):
    """With dropout, whose draws differ per process: the resumed run repeats the straight one."""
    lora = {"rank": 4, "alpha": 8, "dropout": 0.2}
    common = dict(finetune="lora", lora=lora, max_steps=6, save_steps=3,
                  eval={"held_out": 3})
    launch(write_config(published, "straight", **common), published)
    straight = run_folder(published / "straight")
    # A crash after step 4: checkpoint-3 complete, metrics written up to step 4.
    resumed = published / "resumed" / straight.name
    shutil.copytree(straight, resumed)
    for late in ("checkpoint-6", "final", "run_manifest.json"):
        shutil.rmtree(resumed / late) if (resumed / late).is_dir() else (resumed / late).unlink()
    (resumed / "metrics.jsonl").write_text("".join(
        json.dumps(m) + "\n" for m in metric_lines(straight) if m["step"] <= 4))

    launch(write_config(published, "resumed", **common), published)

    manifest = json.loads((resumed / "run_manifest.json").read_text())
    assert manifest["resumed_from_step"] == 3 and manifest["steps"] == 6

    def without_timing(folder):
        return [{k: v for k, v in m.items() if k not in TIMING} for m in metric_lines(folder)]

    assert without_timing(resumed) == without_timing(straight)
    from safetensors.torch import load_file

    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_the_training_flow_launches_train_processes_through_torchrun(two_and_one, published,
                                                                     monkeypatch):
    """`train.processes: 2`: the flow (so `cpo-data train` and a triggered deployment) runs
    the same two-process training, and its record is rank 0's run manifest."""
    from pipelines.train import train_cpo
    from tests.conftest import processes_with_env
    from training.launch import LAUNCH_CONFIG
    from training.loop import TrainingError

    _, one = two_and_one
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK_ENV, mark)  # inherited by torchrun and its workers
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = train_cpo(str(write_config(published, "flow", processes=2)))
    folder = run_folder(published / "flow")
    assert record == json.loads((folder / "run_manifest.json").read_text())
    assert record["config"]["processes"] == 2 and record["steps"] == 3
    assert (folder / LAUNCH_CONFIG).exists()
    # The same steps as one process with the same global batch: it did train on two.
    for a, b in zip(metric_lines(one), metric_lines(folder), strict=True):
        assert b["loss" if "loss" in a else "eval/loss"] == pytest.approx(
            a["loss" if "loss" in a else "eval/loss"], rel=SAME)

    broken = write_config(published, "broken", processes=2, model=str(published / "none"))
    with pytest.raises(TrainingError, match=r"training on 2 processes failed \(torchrun exit "
                       r"[1-9]\d*\); error \(rank [01]\): .*none"):
        train_cpo(str(broken))
    assert processes_with_env(f"{MARK_ENV}={mark}") == []


def test_a_launch_config_holds_absolute_paths(tmp_path, monkeypatch):
    """A TrainConfig made in code may hold relative paths; the launched processes read the
    YAML from the run folder, so they must get the paths as this process means them."""
    from training.config import TrainConfig, load_train_config
    from training.launch import write_launch_config

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(model="./model", dataset="store/mt", output_dir="runs", processes=2)
    path = write_launch_config(config, tmp_path / "runs" / "v1")
    again = load_train_config(path)
    assert (again.model, again.dataset, again.output_dir) == (
        str(tmp_path / "model"), str(tmp_path / "store" / "mt"), str(tmp_path / "runs"))
    assert again.processes == 2


def test_more_processes_than_gpus_is_refused_before_any_starts(monkeypatch):
    from training.config import TrainConfig
    from training.launch import check_gpus
    from training.loop import TrainingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(TrainConfig(model="m", dataset="d", processes=2))
    with pytest.raises(TrainingError, match=r"train.processes: 4 processes need as many GPUs; "
                       r"2 visible"):
        check_gpus(TrainConfig(model="m", dataset="d", processes=4))
    check_gpus(TrainConfig(model="m", dataset="d", processes=4, device="cpu"))  # gloo


def _refuse_writes(root: str, rank: int) -> None:
    """Make every file-system change Python makes under `root` fail in this process.

    Writers in C++ or Rust (torch.save, safetensors) bypass the audit hooks, but they write
    into folders that Python creates first (`os.mkdir` is refused), so they never start."""
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink",
               "os.link", "os.chmod", "shutil.rmtree", "shutil.copyfile", "shutil.move"}

    def under_root(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if (event == "open" and args[2] & write and under_root(args[0])) or \
                (event in changes and any(under_root(a) for a in args[:2])):
            raise PermissionError(f"rank {rank} may not write under the run's folders: "
                                  f"{event} {args[:2]}")

    sys.addaudithook(hook)


if __name__ == "__main__":  # one torchrun worker of `launch`
    import runpy

    rank = int(os.environ["RANK"])
    if rank:
        _refuse_writes(os.environ[ROOT_ENV], rank)
        probe = Path(os.environ[ROOT_ENV]) / "rank-1-probe"
        try:
            probe.write_text("the guard is off")
        except PermissionError:
            pass
    runpy.run_module("training", run_name="__main__", alter_sys=True)
