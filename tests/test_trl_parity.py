"""One batch through our CPO/ORPO path and through TRL's own trainers: the same numbers.

Our side is the training loop's real path: `tokenize_triplets` -> `collate` -> `forward_logps`
-> `preference_loss`. TRL's side is `CPOTrainer` / `ORPOTrainer` (trl.experimental) as a user
would build them: they tokenize the dataset in `__init__` (`tokenize_row`), we collate its rows
with `trainer.data_collator` and call `trainer.get_batch_loss_metrics(trainer.model, batch)`.
Both sides run the same float64 model object.

The triplets avoid only what we do differently from TRL by design:
- no truncation (TRL never cuts prompts, we do): `MAX_LENGTH` is far above every example;
- BOS and EOS: both sides add them where the text does not carry them (one row's text does);
- prompt/completion boundaries where the joint tokenization changes at most the prompt's last
  token: TRL then moves exactly one token into the completion, we split at the longest common
  prefix, and the two agree. (Where the merge reaches two tokens back, e.g. "... Plea" + "se."
  tokenizing "le", "a" into "lease", TRL keeps "lease" in the prompt and we do not.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpo_data.testing import build_tiny_causal_lm
from training.config import LengthSettings, TrainConfig
from training.data import IGNORE, collate, tokenize_triplets
from training.forward import (
    accepts_logits_to_keep,
    forward_logps,
    nll_covers_prompt,
    preference_loss,
)

with warnings.catch_warnings():  # "You are importing from 'trl.experimental'": we know
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

# Both sides run the model in float64 and sum the same float64 token log-probabilities, so
# they would agree to ~1e-15. TRL's ORPO casts the mean log-probabilities to float32 (`.float()`)
# before the odds ratio, so its rewards and odds-ratio terms carry float32 rounding (~1e-7
# relative). 1e-4 is far above both, and far below what one token more or less in the
# objective changes: leaving out the first completion token of the batch's shortest-prompt row
# moves logps/chosen by 3.8% (summed: CPO sigmoid, hinge) or 1.8% (per-token mean: ipo, simpo,
# orpo), nll_loss by 0.8% and the loss by 0.26% (orpo) to 7.6% (ipo) with this model and batch;
# `test_one_token_shift_is_far_above_the_tolerance` keeps each above 20x the tolerance.
REL = 1e-4
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128  # no example comes near either: nothing is truncated

# The first prompt ends mid-word: " a" + "b." tokenizes jointly as " ab" + ".", so the chosen
# side's prompt loses its last token to the completion while the rejected side's keeps it.
# Prompts are 8 to 50 tokens long, so the shortest prompt (the first) is not every row's and
# `trim_logits` must keep logits back to the first row's completion.
ROWS = [
    {"prompt": "English: a", "chosen": "b.", "rejected": " cat."},
    {"prompt": "Translate this from German to English:\nGerman: Es regnet.\nEnglish:",
     "chosen": " It rains.", "rejected": " It is raining."},
    {"prompt": "Translate this from German to English:\nGerman: Der Zug fährt um acht Uhr ab."
               "\nEnglish:",
     "chosen": " The train leaves at eight.", "rejected": " The train drives at eight clock off."},
    {"prompt": "Translate this from English to German:\nEnglish: Please close the window."
               "\nGerman: Bitte schlie",
     "chosen": "ßen Sie das Fenster.", "rejected": "ße das Fenster."},
    # Texts that carry BOS and EOS themselves: neither side adds a second.
    {"prompt": "<s>Translate: Danke!\nEnglish:", "chosen": " Thanks!</s>",
     "rejected": " Thank.</s>"},
]

# Non-default settings, so that a parameter one side ignores shows.
CASES = {
    "cpo-sigmoid": dict(loss="cpo", loss_type="sigmoid", beta=0.3, cpo_alpha=0.7),
    "cpo-sigmoid-smoothed": dict(loss="cpo", loss_type="sigmoid", beta=0.3, cpo_alpha=0.7,
                                 label_smoothing=0.2),
    "cpo-hinge": dict(loss="cpo", loss_type="hinge", beta=0.1, cpo_alpha=0.7),
    "cpo-ipo": dict(loss="cpo", loss_type="ipo", beta=0.3, cpo_alpha=0.7),
    "cpo-simpo": dict(loss="cpo", loss_type="simpo", beta=0.3, cpo_alpha=0.7, simpo_gamma=0.4),
    "orpo": dict(loss="orpo", orpo_lambda=0.25),
}
COMPARED = ("loss", "nll_loss", "logps/chosen", "logps/rejected", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "rewards/accuracies")
ORPO_ONLY = ("log_odds_ratio", "log_odds_chosen")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama's folder, its tokenizer, and the model in float64 and eval mode.

    The weight matrices are redrawn with std 0.3: at the default 0.02 every token's
    log-probability is -log V +- 0.1 and hardly depends on the context, so a per-token mean
    would barely notice one token more or less. At 0.3 they vary by nats."""
    path = str(build_tiny_causal_lm(tmp_path_factory.mktemp("model") / "llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                            dtype=parameter.dtype) * 0.3)
    return path, tokenizer, model


def _config(path: str, case: str) -> TrainConfig:
    lengths = LengthSettings(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    return TrainConfig(model=path, lengths=lengths, **CASES[case])


def _ours(config: TrainConfig, tokenizer, model, trim_logits: bool):
    examples, report = tokenize_triplets(tokenizer, ROWS, MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert report.truncated == 0
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = forward_logps(model, batch, nll_covers_prompt(config), trim_logits)
    out = preference_loss(config, logps)
    return examples, out.loss.item(), out.metrics


def _trl_trainer(config: TrainConfig, tokenizer, model, output_dir):
    common = dict(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False, fp16=False,
                  max_length=MAX_LENGTH, per_device_train_batch_size=len(ROWS),
                  remove_unused_columns=False, save_strategy="no", disable_tqdm=True)
    dataset = Dataset.from_list(ROWS)
    if config.loss == "orpo":
        args = ORPOConfig(beta=config.orpo_lambda, **common)
        return ORPOTrainer(model=model, args=args, train_dataset=dataset,
                           processing_class=tokenizer)
    args = CPOConfig(loss_type=config.loss_type, beta=config.beta, cpo_alpha=config.cpo_alpha,
                     label_smoothing=config.label_smoothing, simpo_gamma=config.simpo_gamma,
                     **common)
    return CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_examples_cover_the_boundary_merge_and_varied_prompt_lengths(tiny):
    """The cases the parity test relies on are really there with the tiny tokenizer."""
    _, tokenizer, _ = tiny
    first = ROWS[0]
    alone = _ids(tokenizer, first["prompt"])
    joint = _ids(tokenizer, first["prompt"] + first["chosen"])
    assert joint[: len(alone)] != alone  # the boundary tokenizes differently joined
    assert joint[: len(alone) - 1] == alone[:-1]  # ... in the prompt's last token only
    rejected = _ids(tokenizer, first["prompt"] + first["rejected"])
    assert rejected[: len(alone)] == alone  # the rejected side's boundary does not merge
    # No truncation on either side, and prompts of clearly different lengths.
    lengths = [len(_ids(tokenizer, row["prompt"])) for row in ROWS]
    assert sorted(lengths) == sorted(set(lengths)) and max(lengths) >= 4 * min(lengths)
    longest = max(len(_ids(tokenizer, row["prompt"] + row[side])) + 2
                  for row in ROWS for side in ("chosen", "rejected"))
    assert longest < MAX_PROMPT_LENGTH < MAX_LENGTH
    # One row's texts carry BOS and EOS themselves, the others' do not.
    carry = [(_ids(tokenizer, row["prompt"])[0] == tokenizer.bos_token_id,
              {_ids(tokenizer, row["prompt"] + row[side])[-1] == tokenizer.eos_token_id
               for side in ("chosen", "rejected")}) for row in ROWS]
    assert carry == [(False, {False})] * (len(ROWS) - 1) + [(True, {True})]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in (
        tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize("case", list(CASES))
def test_one_batch_matches_trl(tiny, case, tmp_path):
    path, tokenizer, model = tiny
    config = _config(path, case)
    # Our defaults are TRL's: ORPO's NLL covers the prompt (TRL has no other choice).
    assert config.loss != "orpo" or nll_covers_prompt(config)
    assert accepts_logits_to_keep(model)  # so the loop trims, as trim_logits=True does here
    trainer = _trl_trainer(config, tokenizer, model, tmp_path / "trl")
    # TRL neither wrapped nor converted the model: both sides run the same float64 weights.
    assert trainer.model is model and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float64}

    rows = [trainer.train_dataset[i] for i in range(len(ROWS))]
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model,
                                                               trainer.data_collator(rows))
    trl_metrics = {"loss": trl_loss.item(), **trl_metrics}
    assert trl_loss.dtype == torch.float64

    for trim_logits in (True, False):
        examples, loss, metrics = _ours(config, tokenizer, model, trim_logits)
        # The same token ids and the same prompt/completion split, row by row.
        for mine, theirs in zip(examples, rows, strict=True):
            assert mine.chosen_ids == theirs["chosen_input_ids"]
            assert mine.rejected_ids == theirs["rejected_input_ids"]
            assert mine.chosen_prompt_length == theirs["chosen_labels"].count(IGNORE)
            assert mine.rejected_prompt_length == theirs["rejected_labels"].count(IGNORE)
        assert loss == metrics["loss"]
        keys = COMPARED + (ORPO_ONLY if config.loss == "orpo" else ())
        ours = {key: metrics[key] for key in keys}
        theirs = {key: trl_metrics[key] for key in keys}
        assert ours == pytest.approx(theirs, rel=REL), f"trim_logits={trim_logits}"


def test_one_token_shift_is_far_above_the_tolerance(tiny):
    """The size of the error the parity test must catch: the first completion token of the
    row with the batch's shortest prompt left out of the objective."""
    path, tokenizer, model = tiny
    examples, _ = tokenize_triplets(tokenizer, ROWS, MAX_LENGTH, MAX_PROMPT_LENGTH)
    batch = collate(examples, tokenizer.pad_token_id)
    first = (batch["labels"] != IGNORE).float().argmax(-1)
    shifted = dict(batch, labels=batch["labels"].clone())
    for row in torch.nonzero(first == first.min()).flatten().tolist():
        shifted["labels"][row, first[row]] = IGNORE
    for case in CASES:
        config = _config(path, case)
        full = nll_covers_prompt(config)
        with torch.no_grad():
            exact = preference_loss(config, forward_logps(model, batch, full, False)).metrics
            off = preference_loss(config, forward_logps(model, shifted, full, False)).metrics
        # ORPO's NLL covers the prompt, which the shift does not change.
        for key in ("loss", "logps/chosen") + (() if full else ("nll_loss",)):
            change = abs(off[key] / exact[key] - 1)
            assert change > 20 * REL, (case, key, change)
