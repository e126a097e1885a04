"""Candidate generation with Hugging Face models: causal LMs (ALMA, chat models), Marian, NLLB,
M2M100, with LoRA adapters through peft.

Batches are filled by token count, not row count: sources are sorted by tokenized length and
each batch takes rows while rows x (longest prompt + new tokens) x sequences per row stays under
the budget; results come back in the caller's order. Causal models are left-padded so every row's
new tokens start at the same column. On CUDA out-of-memory a batch is split in half and retried.
Each text says whether its generation ran to `max_new_tokens` without ending (`Ending`).
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpo_data.backends.torch_device import halving_on_oom, pick_device, pick_dtype
from cpo_data.batching import token_budget_batches
from cpo_data.config import GeneratorConfig
from cpo_data.generate import Generated, GenerateError, Request
from cpo_data.identity import decoding, generator_identity, scheme_of_tokenizer_class
from cpo_data.langs import get_language
from cpo_data.select import render_prompt

log = logging.getLogger(__name__)


def _looks_like_path(model: str) -> bool:
    """`./m`, `/m`, `~/m` or `a/b/c` are folders; a hub id is `name` or `org/name`."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def _load_error(model: str, error: Exception) -> GenerateError:
    if _looks_like_path(model) or Path(model).expanduser().exists():
        return GenerateError(f"model path {model!r} does not exist or is not a model folder "
                             f"({error})")
    return GenerateError(
        f"cannot load {model!r}: it is not a local folder and the Hugging Face hub did not "
        f"provide it ({type(error).__name__}: {error}). This machine may be offline "
        "(HF_HUB_OFFLINE, no network): download the model where there is a network "
        "(huggingface-cli download) and point `model` at the folder or the HF cache."
    )


@functools.lru_cache(maxsize=4)
def _load(model: str, revision: str | None, adapter: str | None, kind: str, device: str,
          dtype: str) -> tuple[Any, Any, bool]:
    """Model and tokenizer, loaded once per process for the same arguments."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as error:
        raise _load_error(model, error) from None
    seq2seq = config.is_encoder_decoder if kind == "auto" else kind == "seq2seq"
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    network = loader.from_pretrained(model, revision=revision, dtype=torch_dtype)
    if adapter:
        from peft import PeftModel

        try:
            network = PeftModel.from_pretrained(network, adapter)
        except (OSError, ValueError) as error:
            raise _load_error(adapter, error) from None
        # Merged weights generate as fast as the base model; the adapter stays on disk as is.
        network = network.merge_and_unload()
    network.to(torch_device).eval()
    if not seq2seq:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return network, tokenizer, seq2seq


def _token_ids(*values: int | list[int] | None) -> frozenset[int]:
    """The ids in settings that hold an id, a list of ids or nothing (eos_token_id)."""
    ids: set[int] = set()
    for value in values:
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return frozenset(ids)


@dataclass(frozen=True)
class Ending:
    """How to tell a generation that ended from one cut at `limit` new tokens."""

    ends: frozenset[int]
    """End-of-sequence ids: the one passed to generate and the generation config's. generate
    stops at the passed one only, but any of them in the output means the model ended."""
    limit: int
    """max_new_tokens."""
    forced: bool
    """The model forces an end token into the last slot (`forced_eos_token_id`, as mBART and
    Marian checkpoints do): an end there is the limit's, not the model's."""

    def stopped_at_limit(self, generated: Sequence[int], text: str | None = None) -> bool:
        """Whether one returned sequence ran to the limit: no end token among its `generated`
        tokens (those after the prompt, or after a seq2seq decoder's start token, which is
        EOS for NLLB and mBART), or only the forced one. For a causal model `text` is its
        decoded output, of which `_clean` keeps the first line: a line break after that line's
        text means the translation was finished before the limit, end token or not."""
        first_end = next((i for i, token in enumerate(generated) if token in self.ends), None)
        if first_end is not None and not (self.forced and first_end == self.limit - 1):
            return False
        return text is None or "\n" not in text.lstrip()


def _language_tokens(tokenizer: Any, configured: str) -> str | None:
    """Which language-token scheme a seq2seq tokenizer uses: nllb, m2m, or none (Marian)."""
    if configured != "auto":
        return None if configured == "none" else configured
    return scheme_of_tokenizer_class(type(tokenizer).__name__)


class HFGenerator:
    """A `Generator` over one Hugging Face model (and optional LoRA adapter)."""

    def __init__(self, config: GeneratorConfig):
        self.config = config
        self.name = config.name
        self.model, self.tokenizer, self.seq2seq = _load(
            config.model, config.revision, config.adapter, config.kind, config.device,
            config.dtype)
        self.device = next(self.model.parameters()).device
        self.scheme = (_language_tokens(self.tokenizer, config.language_tokens) if self.seq2seq
                       else None)
        self._src_token_id: int | None = None
        self._prompt_overhead: dict[tuple[str, str], int] = {}
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.context = positions or 1 << 30
        # Computed from the config and files, as the build computes it before any model
        # loads; what this loaded model turned out to be must agree with it.
        self.identity = generator_identity(config)
        kind = "seq2seq" if self.seq2seq else "causal"
        if kind != self.identity["kind"]:
            raise GenerateError(f"{config.model}: loads as a {kind} model, but its config.json "
                                f"says {self.identity['kind']}; set kind: {kind} for it")
        if self.scheme != self.identity["language_tokens"]:
            raise GenerateError(
                f"{config.model}: its tokenizer uses {self.scheme or 'no'} language tokens, but "
                f"its tokenizer_config.json says {self.identity['language_tokens'] or 'none'}; "
                f"set language_tokens: {self.scheme or 'none'} for it")
        # Counters for tests, benchmarks and the run summary.
        self.batches = 0
        self.oom_splits = 0

    @property
    def decoding(self) -> dict[str, Any]:
        return decoding(self.config)

    # ---- prompts ------------------------------------------------------------------------------

    def _source_limit(self, prompt_overhead: int) -> int:
        # A causal model's context holds prompt and output; an encoder's holds the source only.
        output = 0 if self.seq2seq else self.config.max_new_tokens
        room = self.context - output - prompt_overhead
        return max(1, min(self.config.max_source_tokens, room))

    def _truncate(self, text: str, limit: int) -> tuple[str, bool]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text, False
        return self.tokenizer.decode(ids[:limit], skip_special_tokens=True), True

    def _prompt_ids(self, request: Request) -> tuple[list[int], bool]:
        """Token ids the model reads for one request; truncation cuts the source text only, so
        the prompt's instruction and its closing `{Tgt}:` survive."""
        if self.seq2seq:
            src, cut = self._truncate(request.src, self._source_limit(4))
            ids = self.tokenizer(src)["input_ids"]
            if self._src_token_id is not None and ids[:1] != [self._src_token_id]:
                ids = [self._src_token_id, *ids]  # tokenizers without a src_lang setting
            return ids, cut
        specials = not self.config.use_chat_template  # a chat template writes its own BOS
        pair = (request.src_lang, request.tgt_lang)
        if pair not in self._prompt_overhead:  # the prompt's own tokens depend on the pair only
            empty = self._render(request, "")
            self._prompt_overhead[pair] = len(
                self.tokenizer(empty, add_special_tokens=specials)["input_ids"])
        overhead = self._prompt_overhead[pair]
        ids = self.tokenizer(self._render(request, request.src),
                             add_special_tokens=specials)["input_ids"]
        if len(ids) - overhead <= self._source_limit(overhead):
            return ids, False  # the common case: one tokenization
        src, _ = self._truncate(request.src, self._source_limit(overhead))
        ids = self.tokenizer(self._render(request, src), add_special_tokens=specials)
        return ids["input_ids"], True

    def _render(self, request: Request, src: str) -> str:
        prompt = render_prompt(self.config.prompt_template, request.src_lang, request.tgt_lang,
                               src)
        if not self.config.use_chat_template:
            return prompt
        if not self.tokenizer.chat_template:
            raise GenerateError(f"{self.name}: use_chat_template is set but the tokenizer of "
                                f"{self.config.model!r} has no chat template")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def _language_setup(self, src_lang: str, tgt_lang: str) -> dict[str, Any]:
        """Source-language state on the tokenizer and the forced first target token."""
        if self.scheme is None:
            return {}
        src, tgt = get_language(src_lang), get_language(tgt_lang)
        codes = ({"src": src.nllb, "tgt": tgt.nllb} if self.scheme == "nllb"
                 else {"src": src.m2m, "tgt": tgt.m2m})
        tgt_token = codes["tgt"] if self.scheme == "nllb" else f"__{codes['tgt']}__"
        src_token = codes["src"] if self.scheme == "nllb" else f"__{codes['src']}__"
        vocab = self.tokenizer.get_vocab()
        for lang, token in ((src_lang, src_token), (tgt_lang, tgt_token)):
            if token not in vocab:
                raise GenerateError(f"{self.name}: the tokenizer of {self.config.model!r} has "
                                    f"no language token for {lang!r} ({token})")
        if hasattr(self.tokenizer, "src_lang"):
            self.tokenizer.src_lang = codes["src"]
        self._src_token_id = vocab[src_token]
        return {"forced_bos_token_id": vocab[tgt_token]}

    # ---- batching -----------------------------------------------------------------------------

    def _sequences_per_row(self) -> int:
        c = self.config
        return c.num_beams if c.strategy == "beam" else c.num_candidates

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices per batch: longest first, each batch under the token budget."""
        per_row = self._sequences_per_row()
        return token_budget_batches(
            lengths, lambda longest: (longest + self.config.max_new_tokens) * per_row,
            self.config.token_budget, self.config.max_batch_size)

    def _generation_kwargs(self) -> dict[str, Any]:
        c = self.config
        kwargs: dict[str, Any] = {"max_new_tokens": c.max_new_tokens,
                                  "num_return_sequences": c.num_candidates,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if c.strategy == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif c.strategy == "beam":
            kwargs.update(do_sample=False, num_beams=c.num_beams)
        else:
            kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=0,
                          num_beams=1)
        if not self.seq2seq and self.tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        return kwargs

    def _ending(self, kwargs: dict[str, Any]) -> Ending:
        generation = self.model.generation_config
        return Ending(ends=_token_ids(kwargs.get("eos_token_id"), generation.eos_token_id),
                      limit=self.config.max_new_tokens,
                      forced=generation.forced_eos_token_id is not None)

    def _clean(self, text: str) -> str:
        # ALMA-style causal models run on past the translation: keep the first line only.
        if not self.seq2seq:
            text = text.lstrip().split("\n", 1)[0]
        return text.strip()

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest row: on the left for causal models, on the right for seq2seq."""
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if not self.seq2seq else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.inference_mode()
    def _generate_batch(self, ids: list[list[int]], extra: dict[str, Any]
                        ) -> list[tuple[list[str], list[bool]]]:
        """Per row: its candidates' texts and whether each stopped at max_new_tokens."""
        inputs = {k: v.to(self.device) for k, v in self._pad(ids).items()}
        if self.config.strategy == "sample":
            torch.manual_seed(self.config.seed)
        kwargs = self._generation_kwargs()
        output = self.model.generate(**inputs, **kwargs, **extra)
        if not self.seq2seq:
            output = output[:, inputs["input_ids"].shape[1]:]
        generated = output.tolist()  # one copy off the device, for decoding and the flags
        decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        ending = self._ending(kwargs)
        stopped = [ending.stopped_at_limit(row[1:]) if self.seq2seq
                   else ending.stopped_at_limit(row, text)
                   for row, text in zip(generated, decoded, strict=True)]
        texts = [self._clean(t) for t in decoded]
        n = self.config.num_candidates
        self.batches += 1
        return [(texts[i * n:(i + 1) * n], stopped[i * n:(i + 1) * n]) for i in range(len(ids))]

    def generate(self, requests: Sequence[Request]) -> list[Generated]:
        """Candidates for each request, in order; batches are planned per language pair for
        seq2seq models (the language tokens are per batch) and across pairs for causal ones."""
        results: list[Generated | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.src.strip():
                raise GenerateError(f"source {r.source_id}: empty source text")
            key = (r.src_lang, r.tgt_lang) if self.seq2seq else ("", "")
            groups.setdefault(key, []).append(i)
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, silence in logs and CI.
        progress = tqdm(total=len(requests), desc=f"generate {self.name}", unit="src",
                        disable=None)
        for (src_lang, tgt_lang), members in groups.items():
            extra = self._language_setup(src_lang, tgt_lang) if self.seq2seq else {}
            encoded = [self._prompt_ids(requests[i]) for i in members]
            for batch in self.plan_batches([len(ids) for ids, _ in encoded]):
                outputs, splits = halving_on_oom(
                    lambda ids, extra=extra: self._generate_batch(ids, extra),
                    [encoded[j][0] for j in batch], self.name)
                self.oom_splits += splits
                for j, (texts, stopped) in zip(batch, outputs, strict=True):
                    results[members[j]] = Generated(texts=texts, truncated=encoded[j][1],
                                                    stopped_at_limit=stopped)
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]


def load_generator(config: GeneratorConfig) -> HFGenerator:
    """The generator for one configured model (weights loaded once per process)."""
    return HFGenerator(config)


def release_models() -> None:
    """Forget the models loaded so far, so their memory can go (e.g. before training), and a
    folder rewritten since (a retrained adapter) is read again next time."""
    from cpo_data.backends import loaded

    loaded.forget()  # the generators a build kept hold these models too
    _load.cache_clear()
    gc.collect()  # a model in a reference cycle would hold its CUDA blocks past empty_cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
