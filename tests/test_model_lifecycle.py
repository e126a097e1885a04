"""Model lifecycle: a build's generation and scoring take turns on a device, so a process holds
one stage's models at a time: at its peak the largest stage's, not both stages' together.

The builds here run on CPU, where every model shares "cpu". A `Recorder` counts the backends'
loads and `loaded.release`, and after each holds weak references to the loaded models: a model
still alive after a release would still hold its memory.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from cpo_data import build
from cpo_data.backends import comet_score, hf_generate, loaded
from cpo_data.config import GeneratorConfig, ScorerConfig, load_config
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet
from tests.test_build_flow import DEMO_ROWS, write_config

ROWS = DEMO_ROWS[:24]  # 3 shards of 8

# What each build here does, in order: one generator load for every shard, one release of it
# at the first scorer load, one load per scorer for every shard; nothing loads twice.
PHASES = [("load", "generator", "tiny"), ("release", "generator"),
          ("load", "scorer", "kiwi"), ("load", "scorer", "xcomet"), ("load", "scorer", "chrf")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"causal": str(build_tiny_causal_lm(root / "causal")),
            "kiwi": str(build_tiny_comet(root / "kiwi", "kiwi")),
            "xcomet": str(build_tiny_comet(root / "xcomet", "xcomet"))}


def recipe(tmp_path, models, rows=ROWS, **overrides):
    """ALMA-R's shape in miniature: one generator, two COMET scorers (and chrF, no model)."""
    return write_config(tmp_path, models, rows, **overrides, score={
        "scorers": [{"name": "kiwi", "model": models["kiwi"]},
                    {"name": "xcomet", "model": models["xcomet"]},
                    {"name": "chrf", "kind": "chrf"}],
        "ensembles": [{"name": "kiwi_xcomet", "members": ["kiwi", "xcomet"]}]})


class Recorder:
    """Loads and releases in order, and which models are alive after each."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, ...]] = []
        self.alive_after: list[set[str]] = []
        self._models: list[tuple[str, weakref.ref]] = []
        for module, name, kind in ((hf_generate, "load_generator", "generator"),
                                   (comet_score, "load_scorer", "scorer")):
            monkeypatch.setattr(module, name, self._loading(kind, getattr(module, name)))
        real_release = loaded.release

        def release(keys):
            keys = list(keys)
            self.events.append(("release", *sorted({kind for kind, _ in keys})))
            real_release(keys)
            self._note()

        monkeypatch.setattr(loaded, "release", release)

    def _loading(self, kind, load):
        def counted(config):
            self.events.append(("load", kind, config.name))
            made = load(config)
            if hasattr(made, "model"):  # sacrebleu's scorers hold no model
                self._models.append((f"{kind}:{config.name}", weakref.ref(made.model)))
            self._note()
            return made

        return counted

    def _note(self) -> None:
        gc.collect()
        self.alive_after.append({name for name, ref in self._models if ref() is not None})

    def clear(self) -> None:
        self.events.clear()
        self.alive_after.clear()

    def peak(self) -> int:
        return max(map(len, self.alive_after))

    def both_stages_held(self) -> list[set[str]]:
        """The moments that held a generator and a scorer at once."""
        return [alive for alive in self.alive_after
                if {name.split(":")[0] for name in alive} == {"generator", "scorer"}]


@pytest.fixture
def recorder(monkeypatch):
    # As a fresh process: nothing kept from other tests, so every load here is recorded.
    hf_generate.release_models()
    comet_score._load.cache_clear()
    yield Recorder(monkeypatch)
    hf_generate.release_models()
    comet_score._load.cache_clear()


# What to release: a pure decision on devices.

def test_only_the_other_stage_on_the_same_device_is_released():
    tiny = GeneratorConfig(name="tiny", model="m")
    other = GeneratorConfig(name="other", model="m", device="cuda:1")
    kiwi = ScorerConfig(name="kiwi", model="k")
    chrf = ScorerConfig(name="chrf", kind="chrf")
    kept = {("generator", tiny): "cuda:0", ("generator", other): "cuda:1",
            ("scorer", kiwi): "cuda:0", ("scorer", chrf): None}
    assert loaded.to_release("scorer", "cuda:0", kept) == [("generator", tiny)]
    assert loaded.to_release("scorer", "cuda:1", kept) == [("generator", other)]
    assert loaded.to_release("generator", "cuda:0", kept) == [("scorer", kiwi)]
    assert loaded.to_release("generator", "cuda:2", kept) == []
    assert loaded.to_release("scorer", None, kept) == []  # chrF takes no device memory
    assert loaded.to_release("scorer", "cpu", kept) == []


def test_devices_compare_as_the_backends_resolve_them(monkeypatch):
    import torch

    generator = GeneratorConfig(name="tiny", model="m")
    assert loaded.device_of(generator) == "cpu"  # auto, on this CPU-only machine
    assert loaded.device_of(ScorerConfig(name="kiwi", model="k", device="cpu")) == "cpu"
    assert loaded.device_of(ScorerConfig(name="chrf", kind="chrf", device="cpu")) is None
    # As on a one-GPU machine (nothing touches CUDA: these only name devices).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    named = {device: loaded.device_of(ScorerConfig(name="kiwi", model="k", device=device))
             for device in ("auto", "cuda", "cuda:0", "cuda:1", "cpu")}
    assert named == {"auto": "cuda:0", "cuda": "cuda:0", "cuda:0": "cuda:0",
                     "cuda:1": "cuda:1", "cpu": "cpu"}


# Builds on one device.

@pytest.mark.slow  # several seconds: a whole build with models
def test_run_build_releases_the_generator_before_the_scorers_load(tmp_path, models, recorder):
    summary = build.run_build(load_config(recipe(tmp_path, models)))
    assert summary.shards == 3 and summary.generated == {"tiny": 24}
    assert recorder.both_stages_held() == []
    assert recorder.peak() == 2  # kiwi and xcomet: the largest stage, not 1 + 2
    assert [e[:3] for e in recorder.events] == PHASES
    assert recorder.alive_after[1] == set()  # the release freed the generator's model


@pytest.mark.slow  # several seconds: a whole build with models
def test_on_different_devices_the_generator_stays(tmp_path, models, recorder, monkeypatch):
    """What the build does where generator and scorers sit on two GPUs, told apart here by
    the device names alone (the models still load on CPU)."""
    monkeypatch.setattr(loaded, "device_of", lambda config: (
        "cuda:0" if isinstance(config, GeneratorConfig) else "cuda:1"))
    build.run_build(load_config(recipe(tmp_path, models)))
    assert [e[:3] for e in recorder.events] == [e for e in PHASES if e[0] == "load"]
    assert recorder.alive_after[-1] == {"generator:tiny", "scorer:kiwi", "scorer:xcomet"}


@pytest.mark.slow  # 7-8 s: two builds, each loading a generator and two COMET scorers
def test_a_generator_loading_releases_the_scorers_a_process_kept(tmp_path, models, recorder):
    """A Dask worker outlives builds: the next build's generation frees the last one's
    scorers there before its generator loads."""
    build.run_build(load_config(recipe(tmp_path, models, DEMO_ROWS[:8])))
    recorder.clear()
    # One new source: work for the generator and both COMET scorers again (chrF stays kept).
    build.run_build(load_config(recipe(tmp_path, models, DEMO_ROWS[:9])))
    assert [e[:3] for e in recorder.events] == [
        ("release", "scorer"), ("load", "generator", "tiny"), *PHASES[1:4]]
    assert recorder.alive_after[0] == set()  # kiwi and xcomet were freed
    assert recorder.both_stages_held() == []


# The Prefect flow: the same order on the default runner and on Dask.

@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_the_flow_generates_every_shard_before_scoring_and_resumes(tmp_path, models,
                                                                  recorder):
    from pipelines.build import build_triplets

    config = str(recipe(tmp_path, models))
    summary = build_triplets(config, retries=0)
    assert summary["shards"] == 3 and summary["generated"] == {"tiny": 24}
    assert recorder.both_stages_held() == [] and recorder.peak() == 2
    assert [e[:3] for e in recorder.events] == PHASES
    # Finished shards are reused from Prefect's task cache in both phases: nothing loads.
    hf_generate.release_models()
    comet_score._load.cache_clear()
    recorder.clear()
    again = build_triplets(config, retries=0)
    assert again["shards_reused"] == 3 and again["triplets"] == summary["triplets"]
    assert recorder.events == []


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_on_dask_a_worker_releases_its_generator_when_its_first_scorer_loads(tmp_path, models,
                                                                            recorder):
    """A worker in this process (threads), so that the recorder sees its loads: Dask starts a
    shard's scoring as soon as its candidates exist, unless the flow waits for every shard's
    generation first."""
    from distributed import LocalCluster

    from pipelines.build import build_triplets

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        summary = build_triplets(str(recipe(tmp_path, models, runner={
            "kind": "dask", "address": cluster.scheduler_address})), retries=0)
    assert summary["shards"] == 3 and summary["generated"] == {"tiny": 24}
    assert recorder.both_stages_held() == [] and recorder.peak() == 2
    assert [e[:3] for e in recorder.events] == PHASES
