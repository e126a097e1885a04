"""One frozen dataclass per stage, and the YAML file that holds them all.

The YAML maps onto the dataclasses one to one: every key is a field, an unknown key or a wrong
type is refused before any work starts, with the key's full path in the message
(`sources[0].src_colum: unknown key`). Relative paths resolve against the YAML file's folder.

The score stage's dataclasses are written in `cpo_data.config_score` and re-exported here, so
every config is still imported from this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

# The score stage's configs are written in their own module (its docstring says why); they are
# re-exported, so this module stays the one place every stage's config is imported from.
from cpo_data.config_endpoint import EndpointConfig as EndpointConfig
from cpo_data.config_guards import GuardsConfig as GuardsConfig
from cpo_data.config_score import BLEU_TOKENIZERS as BLEU_TOKENIZERS
from cpo_data.config_score import SCORER_KINDS as SCORER_KINDS
from cpo_data.config_score import EnsembleConfig as EnsembleConfig
from cpo_data.config_score import ScoreConfig as ScoreConfig
from cpo_data.config_score import ScorerConfig as ScorerConfig
from cpo_data.fields import DTYPES as DTYPES  # there: ScorerConfig checks against it too
from cpo_data.fields import (
    FILE,
    MODEL,
    _check_at_least,
    _check_choice,
    _check_device,
    _check_lang,
    _check_prompt,
    _fail,
)
from cpo_data.fields import ConfigError as ConfigError  # its documented home is here too
from cpo_data.noise import noise_thresholds

ALMA_PROMPT = "Translate this from {Src} to {Tgt}:\n{Src}: {src}\n{Tgt}:"
"""ALMA's prompt; {Src}/{Tgt} are English language names, the target follows the colon."""

SOURCE_FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "hf_dataset", "alma_r")
ALMA_R_SCORES = ("kiwi", "xcomet", "kiwi_xcomet")
"""The scores an ALMA-R layout row carries per output: KIWI-XXL, XCOMET-XXL and their mean."""


@dataclass(frozen=True)
class SourcesConfig:
    """Where one file of source segments is and how its columns map onto the sources table."""

    path: str = field(metadata=FILE)
    """A JSONL/CSV/TSV/Parquet file, or the folder of a dataset saved with `save_to_disk`."""
    format: str = "auto"
    """One of auto, jsonl, csv, tsv, parquet, hf_dataset, alma_r; auto goes by the extension."""
    src_lang: str | None = None
    """Source language of every row (or use src_lang_column)."""
    tgt_lang: str | None = None
    """Target language of every row (or use tgt_lang_column)."""
    src_lang_column: str | None = None
    """Column holding each row's source language."""
    tgt_lang_column: str | None = None
    """Column holding each row's target language."""
    src_column: str = "src"
    """Column holding the source text."""
    ref_column: str | None = "ref"
    """Column holding the reference translation; null when the data has none."""
    systems: dict[str, str] = field(default_factory=dict)
    """Provided system outputs: system name -> column (e.g. {gpt4: gpt4_output})."""
    label_column: str | None = None
    """Column with a human preference score, positive meaning label_positive is better."""
    label_positive: str | None = None
    """System preferred when the label is positive."""
    label_negative: str | None = None
    """System preferred when the label is negative."""
    split: str | None = None
    """Split to read from a saved DatasetDict (hf_dataset, alma_r)."""
    directions: tuple[str, ...] = ()
    """alma_r only: directions to build (e.g. [en-de]); empty means what each row allows."""

    def __post_init__(self) -> None:
        if not self.path:
            _fail("path", "must name a file or folder")
        _check_choice("format", self.format, SOURCE_FORMATS)
        _check_lang("src_lang", self.src_lang)
        _check_lang("tgt_lang", self.tgt_lang)
        if self.format != "alma_r":
            if self.src_lang is None and self.src_lang_column is None:
                _fail("src_lang", "set src_lang (whole file) or src_lang_column (per row)")
            if self.tgt_lang is None and self.tgt_lang_column is None:
                _fail("tgt_lang", "set tgt_lang (whole file) or tgt_lang_column (per row)")
        if self.label_column is not None:
            for key in ("label_positive", "label_negative"):
                name = getattr(self, key)
                if name is None:
                    _fail(key, "label_column needs both label_positive and label_negative")
                if name not in self.systems:
                    _fail(key, f"{name!r} is not one of the mapped systems {sorted(self.systems)}")
        for direction in self.directions:
            parts = direction.split("-")
            if len(parts) != 2:
                _fail("directions", f"{direction!r} is not of the form src-tgt (en-de)")
            for code in parts:
                _check_lang("directions", code)


DECODING_STRATEGIES = ("greedy", "beam", "sample")
MODEL_KINDS = ("auto", "causal", "seq2seq")
LANGUAGE_TOKENS = ("auto", "nllb", "m2m", "none")


@dataclass(frozen=True)
class GeneratorConfig:
    """One Hugging Face model that translates the sources into candidates."""

    name: str
    """System name its candidates carry (e.g. alma-13b-lora)."""
    model: str = field(metadata=MODEL)
    """Hub id (haoranxu/ALMA-13B-Pretrain) or local folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); pins what the cache keys on."""
    adapter: str | None = field(default=None, metadata=MODEL)
    """LoRA adapter (hub id or folder) applied on top of `model`, as ALMA ships."""
    kind: str = "auto"
    """auto (from the model config), causal (decoder-only) or seq2seq (Marian, NLLB, M2M100)."""
    prompt_template: str = ALMA_PROMPT
    """Prompt for causal models: {Src}, {Tgt} (English names), {src}, {src_lang}, {tgt_lang}."""
    use_chat_template: bool = False
    """Wrap the prompt as a user turn with the tokenizer's chat template (chat models)."""
    language_tokens: str = "auto"
    """seq2seq only: nllb (deu_Latn), m2m (__de__), none (Marian), or auto from the tokenizer."""
    strategy: str = "greedy"
    """greedy, beam (num_beams, top num_candidates kept) or sample (temperature, top_p, seed)."""
    num_candidates: int = 1
    """Candidates per source."""
    num_beams: int = 4
    """Beam width for strategy beam."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int = 0
    """Sampling seed; each batch starts from it, so a run is reproducible."""
    max_new_tokens: int = 256
    """Longest output, in tokens."""
    max_source_tokens: int = 256
    """Longer sources are truncated to this many tokens (counted and reported)."""
    token_budget: int = 16384
    """Tokens per batch: rows x (prompt + new tokens) x sequences per row."""
    max_batch_size: int = 64
    """Rows per batch at most, whatever the budget allows."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), or a dtype name."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("name", "give the system a name")
        if not self.model:
            _fail("model", "name a hub id or a local folder")
        _check_choice("kind", self.kind, MODEL_KINDS)
        _check_choice("strategy", self.strategy, DECODING_STRATEGIES)
        _check_choice("language_tokens", self.language_tokens, LANGUAGE_TOKENS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_device("device", self.device)
        _check_at_least(self, 1, "num_candidates", "max_new_tokens", "max_source_tokens",
                        "token_budget", "max_batch_size")
        if self.strategy == "greedy" and self.num_candidates != 1:
            _fail("num_candidates", "greedy decoding gives one candidate; use beam or sample")
        if self.strategy == "beam" and self.num_candidates > self.num_beams:
            _fail("num_candidates", f"cannot exceed num_beams ({self.num_beams})")
        if self.temperature <= 0:
            _fail("temperature", "must be positive")
        if not 0 < self.top_p <= 1:
            _fail("top_p", "must be in (0, 1]")
        _check_prompt("prompt_template", self.prompt_template)


REFERENCE_NAME = "ref"


@dataclass(frozen=True)
class GenerateConfig:
    """Which candidates each source gets: provided system outputs and generated ones."""

    provided_systems: tuple[str, ...] | None = None
    """Provided systems that become candidates; null means every one in the sources."""
    include_reference: bool = False
    """Whether the reference is a candidate too (ALMA-R: yes)."""
    reference_name: str = REFERENCE_NAME
    """System name the reference carries when it is a candidate."""
    models: tuple[GeneratorConfig, ...] = ()
    """Hugging Face models that generate candidates."""
    endpoints: tuple[EndpointConfig, ...] = ()
    """Served models (OpenAI-compatible chat completions) that generate candidates."""
    cache_dir: str | None = field(default=None, metadata=FILE)
    """Generation cache (local path or fsspec URI); null turns caching off."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.models] + [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            _fail("models", f"system names must be distinct (models and endpoints), got {names}")
        if self.reference_name in names:
            _fail("reference_name", f"{self.reference_name!r} is also a model's name")


PAIR_MODES = ("best_vs_worst", "best_vs_each", "all_above_margin")


@dataclass(frozen=True)
class SelectConfig:
    """How chosen/rejected pairs are picked and how their prompt is written."""

    prompt_template: str = ALMA_PROMPT
    """Prompt with {Src}, {Tgt} (English language names), {src}, {src_lang}, {tgt_lang}."""
    use_human_labels: bool = True
    """Rows with a human preference take it over the scores."""
    rank_by: str | None = None
    """Score that ranks candidates (a scorer or ensemble name). In a build, null picks the only
    ensemble, else the only scorer; given to `select_triplets`, null means nothing was scored,
    so only human labels make pairs."""
    min_margin: float | None = None
    """Pairs whose chosen score exceeds the rejected one by less than this are dropped
    (`within_noise`); null: the ranking score's noise threshold (`noise_thresholds`), 0 for a
    score that has none."""
    noise_thresholds: dict[str, float] = field(default_factory=dict)
    """Per score name, the smallest difference that is not noise. A build adds the published
    ones (`cpo_data.noise`: KIWI-XXL and XCOMET-XXL 0.0124, KIWI-22 0.0053, COMET-22 0.0056,
    an ensemble the largest of its members') under those given here. The ranking score's is
    the default `min_margin` and the unit of each triplet's `confidence`."""
    agreement: bool = True
    """With several scores, keep a pair only where every one of `agreement_scores` puts the
    chosen side strictly above the rejected one (`scorers_disagree` otherwise)."""
    agreement_scores: tuple[str, ...] | None = None
    """The scores `agreement` consults; null: every score both sides carry."""
    pairs: str = "best_vs_worst"
    """best_vs_worst (ALMA-R): the best against the worst; best_vs_each: the best against
    every candidate at least `min_margin` below it; all_above_margin: every two candidates
    at least `min_margin` apart, the better one chosen."""
    pairs_per_source: int | None = None
    """At most this many pairs per source (best_vs_each, all_above_margin), largest margin
    first; null: no limit."""
    lower_is_better: tuple[str, ...] = ()
    """Scores where lower is better (TER): ranked, compared and given margins the other way
    round. A build adds its TER scorers."""
    reference_may_be_chosen: bool = True
    """Whether the reference, when it is a candidate, may be the chosen side."""
    reference_may_be_rejected: bool = True
    """Whether the reference, when it is a candidate, may be the rejected side."""
    exclude_systems: tuple[str, ...] = ()
    """Systems whose candidates are never paired (a text another system also gave stays)."""
    vetoed_may_be_rejected: bool = False
    """Whether a candidate a guard vetoed may be the rejected side (a wrong-language output is
    a useful negative); it is never the chosen side."""
    reference_name: str | None = None
    """System name the reference carries among the candidates (for the two reference rules);
    null: "ref". A build fills it from `generate.reference_name`, where it is set."""

    def __post_init__(self) -> None:
        _check_prompt("prompt_template", self.prompt_template)
        if self.min_margin is not None and not 0 <= self.min_margin < math.inf:
            _fail("min_margin", f"must be a finite number >= 0, got {self.min_margin}")
        for name, threshold in self.noise_thresholds.items():
            if not 0 <= threshold < math.inf:
                _fail(f"noise_thresholds.{name}", f"must be a finite number >= 0, got "
                      f"{threshold}")
        _check_choice("pairs", self.pairs, PAIR_MODES)
        if self.pairs_per_source is not None:
            _check_at_least(self, 1, "pairs_per_source")
            if self.pairs == "best_vs_worst" and self.pairs_per_source > 1:
                _fail("pairs_per_source", f"best_vs_worst makes one pair per source; for up to "
                      f"{self.pairs_per_source}, set pairs: best_vs_each (the best against "
                      "each worse candidate, worst first) or all_above_margin")
        if self.agreement_scores is not None and not self.agreement_scores:
            _fail("agreement_scores", "name at least one score, or null for all of them")

    @property
    def margin_floor(self) -> float:
        """The smallest margin a pair may have: `min_margin`, else the ranking score's noise."""
        if self.min_margin is not None:
            return self.min_margin
        return self.noise_thresholds.get(self.rank_by, 0.0) if self.rank_by else 0.0


@dataclass(frozen=True)
class PublishConfig:
    """Where versions of the triplet dataset are published."""

    uri: str = field(metadata=FILE)
    """Store root: a local path or an fsspec URI (s3://bucket/prefix)."""
    name: str
    """Dataset name; versions live under {uri}/{name}/."""
    license: str | None = None
    """Hub licence id of the published data (cc-by-nc-sa-4.0, apache-2.0, other), written to
    the manifest and the dataset card; null: the card says the licence is unknown."""
    conversational: bool = False
    """Also publish the rows in TRL's conversational format, as the card's `conversational`
    config (`load_dataset(version_dir, "conversational")`), for chat models."""
    report: bool = True
    """Write `report.html` into each version (`__attachments__/`): score distributions,
    margins, system win/loss, drops and vetoes, sample pairs (README, "The report")."""
    lock_wait_s: float = 0.0
    """How long a build waits for another build of the same dataset to finish (one writer per
    dataset: `store.dataset_lock`); 0: stop at once, naming the build that holds the lock."""

    def __post_init__(self) -> None:
        if not self.uri:
            _fail("uri", "must name a folder or fsspec URI")
        if not self.name or "/" in self.name or self.name.startswith((".", "_")):
            _fail("name", f"{self.name!r} must be a plain folder name")
        if not 0 <= self.lock_wait_s < float("inf"):
            _fail("lock_wait_s", f"{self.lock_wait_s} must be 0 or more seconds")
        if self.license is not None and (not self.license[:1].isalnum() or set(self.license)
                                         - set("abcdefghijklmnopqrstuvwxyz0123456789.+-")):
            _fail("license", f"{self.license!r} is not a Hub licence id (lower case, no "
                  "spaces: cc-by-nc-sa-4.0, apache-2.0, mit, other)")


RUNNER_KINDS = ("threads", "dask")


@dataclass(frozen=True)
class RunnerConfig:
    """Where the build's generation and scoring shards run."""

    kind: str = "threads"
    """threads: one shard at a time in the flow's own process; dask: on a Dask cluster, one
    shard per worker at a time (one worker per GPU)."""
    address: str | None = None
    """dask: scheduler of a running cluster (tcp://host:8786); null starts a local cluster on
    this machine for the build and stops it after."""
    workers: int | None = None
    """dask, local cluster: worker processes; null means one per visible GPU, else 1."""
    dashboard: str | None = "127.0.0.1:8787"
    """dask, local cluster: HOST:PORT of Dask's dashboard; null: none. The default listens on
    this machine only (the dashboard has no login and shows task names, file paths and
    worker logs); 0.0.0.0:8787 opens it to the network. Dask replaces a port in use by a free
    one. Ignored with address (a running cluster has its own)."""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, RUNNER_KINDS)
        if self.kind != "dask":
            for key in ("address", "workers"):
                if getattr(self, key) is not None:
                    _fail(key, "only applies with kind: dask")
        if self.workers is not None:
            _check_at_least(self, 1, "workers")
            if self.address is not None:
                _fail("workers", "sizes a local cluster; a running cluster (address) has the "
                      "workers it was started with")
        if self.address is not None and not self.address.strip():
            _fail("address", "name a scheduler (tcp://host:8786), or null for a local cluster")
        if self.dashboard is not None:
            self._check_dashboard(self.dashboard)

    @staticmethod
    def _check_dashboard(value: str) -> None:
        # Dask itself reads ":8787" as every interface; a host is required so that opening
        # the dashboard to the network is written out (0.0.0.0), never implied.
        host, colon, port = value.rpartition(":")
        if not (colon and host.strip() and port.isdigit() and int(port) <= 65535):
            _fail("dashboard", f"{value!r} is not HOST:PORT (127.0.0.1:8787 for this machine "
                  "only, 0.0.0.0:8787 for every interface), or null for no dashboard")


@dataclass(frozen=True)
class BuildConfig:
    """A whole build, as one YAML file holds it."""

    sources: tuple[SourcesConfig, ...]
    """One entry per source file."""
    publish: PublishConfig
    """Where the triplets go."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Which candidates each source gets."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """How candidates are scored."""
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    """Checks that veto a candidate before ranking (README, "Trusting the pairs")."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """How pairs are picked."""
    work_dir: str = field(default=".cpo-data/work", metadata=FILE)
    """Caches and finished shards of the build flow; a rerun resumes from here."""
    shard_size: int = 1000
    """Sources per generation and scoring task."""
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    """Where the shards run: in the flow's process (threads) or on a Dask cluster."""

    def __post_init__(self) -> None:
        if not self.sources:
            _fail("sources", "list at least one source file")
        _check_at_least(self, 1, "shard_size")
        if self.runner.kind == "dask" and self.work_dir.startswith("memory://"):
            # Finished shards and caches are written by the workers and read by the flow.
            _fail("work_dir", "memory:// lives in one process; Dask workers need storage they "
                  "all reach (a shared folder, or an fsspec URI such as s3://bucket/work)")
        computed = self.score.names
        known = computed + [n for n in self.carried_scores if n not in computed]
        if self.select.rank_by is not None and self.select.rank_by not in known:
            _fail("select.rank_by", f"{self.select.rank_by!r} is not a scorer or ensemble, "
                  f"nor a score the sources carry ({known})")
        for key in ("agreement_scores", "noise_thresholds"):
            unknown = [n for n in getattr(self.select, key) or () if n not in known]
            if unknown:
                _fail(f"select.{key}", f"{unknown} are not scores of this build ({known})")
        spans = [n for n in self.guards.critical_error.scorers
                 if n not in {s.name for s in self.score.scorers}]
        if spans:
            _fail("guards.critical_error.scorers", f"{spans} are not scorers of this build "
                  f"({[s.name for s in self.score.scorers]})")
        if self.select.exclude_systems and self.rank_by is None:
            _fail("select.exclude_systems", "only applies when candidates are ranked by a score")
        if self.score.scorers and self.rank_by is None:
            _fail("select.rank_by", "several scores exist: name the one that ranks candidates")
        if self.select.reference_name not in (None, self.generate.reference_name):
            _fail("select.reference_name", "the reference's name is set in one place, "
                  "generate.reference_name")

    @property
    def carried_scores(self) -> tuple[str, ...]:
        """Scores the sources bring themselves (the ALMA-R layout's `kiwi`, `xcomet`,
        `kiwi_xcomet`): `select.rank_by` may name one with no scorer configured. A scorer or
        ensemble of the same name replaces the carried score."""
        return ALMA_R_SCORES if any(s.format == "alma_r" for s in self.sources) else ()

    @property
    def selection(self) -> SelectConfig:
        """`select` with everything selection needs filled in: the resolved `rank_by`, the
        reference's name from `generate`, and the published noise thresholds of the build's
        scores under those the config gives."""
        thresholds = noise_thresholds(self.score, self.carried_scores)
        return dataclasses.replace(self.select, rank_by=self.rank_by,
                                   reference_name=self.generate.reference_name,
                                   noise_thresholds={**thresholds,
                                                     **self.select.noise_thresholds},
                                   lower_is_better=tuple(dict.fromkeys(
                                       [*self.select.lower_is_better,
                                        *(s.name for s in self.score.scorers
                                          if not s.higher_is_better)])))

    @property
    def rank_by(self) -> str | None:
        """The score that ranks candidates: `select.rank_by`, else the only ensemble, else the
        only scorer; None when nothing is scored (or, refused at load, when it is ambiguous)."""
        if self.select.rank_by is not None:
            return self.select.rank_by
        if len(self.score.ensembles) == 1:
            return self.score.ensembles[0].name
        if len(self.score.scorers) == 1:
            return self.score.scorers[0].name
        return None


def load_config(path: str | Path) -> BuildConfig:
    """Read and validate a build YAML (the project file's build sections); relative paths
    resolve against its folder."""
    from cpo_data.project import build_section, read_project

    return build_section(read_project(path))
