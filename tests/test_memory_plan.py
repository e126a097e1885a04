"""The memory plan: each stage's weights per device at the run's dtype, against its memory."""

from __future__ import annotations

import math

import yaml
from safetensors import safe_open

from cpo_data.memory_plan import plan
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet
from pipelines.project import load_project


def _parameters(model_dir) -> tuple[int, int]:
    """The parameter count, and the safetensors header bytes (what the plan's byte count
    also holds besides the tensors)."""
    path = model_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return count, header


def _project(tmp_path, **build):
    model = build_tiny_causal_lm(tmp_path / "llama")
    kiwi = build_tiny_comet(tmp_path / "kiwi")
    (tmp_path / "s.jsonl").write_text('{"src": "x"}\n')
    data = {"sources": [{"path": "s.jsonl", "src_lang": "de", "tgt_lang": "en"}],
            "generate": {"models": [{"name": "g", "model": str(model), "dtype": "bfloat16",
                                     "device": "cpu"}]},
            "score": {"scorers": [{"name": "kiwi", "model": str(kiwi), "device": "cpu"}]},
            "publish": {"uri": "store", "name": "x"},
            "train": {"model": str(model), "finetune": "full", "device": "cpu"}, **build}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    return load_project(tmp_path / "p.yaml"), model


def _loads(report) -> dict[str, str]:
    return {line.split(":")[0]: line for line in report.memory}


def test_each_stage_counts_its_weights_at_the_run_dtype(tmp_path):
    project, model = _project(tmp_path)
    parameters, header = _parameters(model)
    seen = {}
    report = project.preflight()  # real capacity: tiny models fit
    assert report.ok, report.problems

    def capacity(device):
        seen[device] = True
        return 10**12

    report.memory.clear()
    from cpo_data.memory_plan import stage_loads

    loads = {load.stage: load for load in stage_loads(project.build, project.train, report,
                                                      cuda_visible=False)}
    # float32 on disk: bf16 generation holds 2 bytes per parameter, full training 16
    # (weights, gradients, two AdamW moments); the header adds < header bytes / 4 parameters.
    assert abs(loads["generate"].bytes - 2 * parameters) <= header // 2
    assert abs(loads["train"].bytes - 16 * parameters) <= header * 4
    assert loads["score"].dtype == "float32" and loads["score"].bytes > 0
    plan(project.build, project.train, report, capacity=capacity)
    assert set(_loads(report)) == {"generate on cpu", "score on cpu", "train on cpu"}
    assert seen == {"cpu": True}


def test_a_stage_over_its_device_is_a_problem_but_stages_do_not_add_up(tmp_path):
    project, model = _project(tmp_path)
    report = project.preflight()
    from cpo_data.memory_plan import stage_loads

    loads = {load.stage: load.bytes for load in stage_loads(project.build, project.train,
                                                             report, cuda_visible=False)}
    largest = max(loads.values())
    # Room for the largest stage alone: every stage fits, though together they would not.
    report.memory.clear()
    plan(project.build, project.train, report, capacity=lambda device: largest)
    assert report.problems == []
    report.memory.clear()
    plan(project.build, project.train, report, capacity=lambda device: largest - 1)
    (problem,) = report.problems
    stage = max(loads, key=loads.get)
    assert problem.startswith(f"memory: {stage} on cpu holds ")


def test_dask_workers_hold_the_build_stages_elsewhere(tmp_path):
    project, _ = _project(tmp_path, runner={"kind": "dask", "address": "tcp://10.0.0.1:8786"})
    report = project.preflight(train=False)
    report.memory.clear()
    plan(project.build, None, report, capacity=lambda device: 1)  # would not fit here
    assert report.problems == []
    assert all("on each Dask worker's cpu" in line for line in report.memory)
