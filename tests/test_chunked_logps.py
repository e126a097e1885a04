"""Log-probabilities through the LM head in chunks (`training.chunked`) equal the full-logits
path: the same Logps, loss, metrics and gradients, for every loss, LoRA and full fine-tuning,
LoRA on the head, tied embeddings; and no vocabulary-sized tensor of the batch is kept."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import AutoTokenizer

from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from tests.conftest import train_config
from training import loop
from training.chunked import base_model, chunkable
from training.config import LoraSettings
from training.data import collate, tokenize_triplets
from training.forward import (
    forward_logps,
    head_chunk,
    nll_covers_prompt,
    preference_loss,
    prompt_once,
)
from training.packing import pack, packable

# Both paths run the same float64 arithmetic on the same numbers; only which rows share one
# matrix product differs, which can change a dot product's summation order (hidden size 32:
# tens of roundings of 1.1e-16 each) and then a sum over a few hundred positions. n * u bounds
# that near 1e-13 relative on any CPU; a wrong position, target or scale is off by > 1e-3.
SAME = 1e-10
CHUNK = 3  # several chunks per batch, the last one short


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"untied": str(build_tiny_causal_lm(root / "untied")),
            "tied": str(build_tiny_causal_lm(root / "tied", tie_word_embeddings=True))}


def _batch(model_dir: str) -> dict[str, torch.Tensor]:
    rows = sample_triplets(rows_per_pair=2).to_pylist()
    for number, row in enumerate(rows):
        row["chosen"] = " ".join(["good translation"] * (1 + 2 * number))  # uneven lengths
    examples, _ = tokenize_triplets(AutoTokenizer.from_pretrained(model_dir), rows)
    return collate(examples, AutoTokenizer.from_pretrained(model_dir).pad_token_id)


def _step(model, config, batch, chunk, packed=False):
    """One step's Logps, loss, metrics and every trainable weight's gradient."""
    model.zero_grad(set_to_none=True)
    full = nll_covers_prompt(config)
    logps = forward_logps(model, batch, full, True, chunk, packed)
    reference = None
    if config.loss == "dpo":
        from training.forward import reference_logps

        reference = reference_logps(model, batch, True, chunk, packed)
    out = preference_loss(config, logps, reference)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), out.loss.detach(), out.metrics, grads


CASES = {
    "cpo sigmoid, lora": dict(loss="cpo"),
    "cpo simpo, lora": dict(loss="cpo", loss_type="simpo"),
    "orpo, nll on the prompt": dict(loss="orpo", orpo_nll_on_prompt=True),
    "orpo, nll on the completion": dict(loss="orpo", orpo_nll_on_prompt=False),
    "dpo, adapter-off reference": dict(loss="dpo"),
    "cpo, full fine-tuning": dict(loss="cpo", finetune="full"),
    "cpo, lora on the head too": dict(loss="cpo", lora=LoraSettings(
        rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "lm_head"))),
}


def _model(models, tie, case, attention="sdpa"):
    settings = dict(model=models[tie], precision="fp64", seed=0,
                    lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    settings.update(CASES[case])
    config = train_config(**settings)
    model = loop.load_model(config, torch.device("cpu"), None, None)
    base_model(model).config._attn_implementation = attention
    with torch.no_grad():  # an adapter that changes the outputs (peft starts B at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return config, model


# The fast tier keeps a few cases of each matrix (a LoRA loss, ORPO's prompt NLL, a training
# head on tied embeddings); the rest run with the slow tests.
FAST = {("cpo sigmoid, lora", "untied", "sdpa"), ("orpo, nll on the prompt", "tied", "sdpa"),
        ("cpo, full fine-tuning", "tied", "sdpa"), ("dpo, adapter-off reference", "untied",
                                                    "eager")}


def _matrix(attentions=("sdpa",)):
    return [pytest.param(case, tie, attention, id=f"{case}-{tie}-{attention}",
                         marks=() if (case, tie, attention) in FAST else pytest.mark.slow)
            for case in CASES for tie in ("untied", "tied") for attention in attentions]


@pytest.mark.parametrize(("case", "tie", "attention"), _matrix())
def test_chunked_equals_full_logits(models, case, tie, attention):
    config, model = _model(models, tie, case, attention)
    batch = _batch(models[tie])
    assert chunkable(model) is None
    _same_step(_step(model, config, batch, None), _step(model, config, batch, CHUNK), case)


# Gradients, packed against two sequences: transformers' LlamaRMSNorm computes in float32
# whatever the weights' dtype, so the gradient crossing each norm is rounded to float32
# (u = 6e-8). Packed, a prompt position's gradient is both completions' added before that
# rounding; two sequences round each copy's and add after. That is one float32 rounding per
# norm (2 per layer + the last: 5 here) per path, relative to the terms added: about
# 10 u = 6e-7, hence 1e-6 of the terms' size (`_term_scale`). A mask that lets rejected see
# chosen, or a wrong position, moves log-probabilities by more than 1e-3 first.
PACKED_GRADIENTS = 1e-6


@pytest.mark.parametrize(("case", "tie", "attention"), _matrix(("sdpa", "eager")))
def test_the_prompt_once_equals_two_sequences(models, case, tie, attention):
    """One packed sequence per pair (prompt + chosen + rejected, a 4-D mask, restarted
    positions) gives the two-sequence batch's log-probabilities, counts, loss, metrics and
    gradients, the prompt's included (it takes both completions' gradients)."""
    config, model = _model(models, tie, case, attention)
    batch = _batch(models[tie])
    assert packable(model) is None
    two = _step(model, config, batch, None)
    scale = _term_scale(model, config, batch)
    # HF's eager attention takes its softmax in float32 too, over rows that are longer packed
    # (the hidden keys add exact zeros, but the float32 sums run in another order): a few
    # hundred float32 roundings, so 1e-5 for everything; SDPA's softmax stays in float64.
    forward = SAME if attention == "sdpa" else 1e-5
    gradients = PACKED_GRADIENTS if attention == "sdpa" else 1e-5
    for chunk in (CHUNK, None):
        _same_step(two, _step(model, config, batch, chunk, packed=True), case, forward,
                   scale, gradients)


def _term_scale(model, config, batch) -> dict[str, float]:
    """Per weight: sum over the step's sequence terms (each pair's chosen, rejected and NLL
    log-probability) of |d loss / d term| * max |d term / d weight|."""
    model.zero_grad(set_to_none=True)
    logps = forward_logps(model, batch, nll_covers_prompt(config), True, None)
    reference = None
    if config.loss == "dpo":
        from training.forward import reference_logps

        reference = reference_logps(model, batch, True, None)
    loss = preference_loss(config, logps, reference).loss
    terms = [logps.chosen_sum, logps.rejected_sum, logps.nll_sum]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = dict.fromkeys((n for n, _ in named), 0.0)
    coefficients = torch.autograd.grad(loss, terms, retain_graph=True, allow_unused=True)
    for term, coefficient in zip(terms, coefficients, strict=True):
        if coefficient is None:
            continue
        for i in range(term.shape[0]):
            grads = torch.autograd.grad(term[i], [p for _, p in named], retain_graph=True,
                                        allow_unused=True)
            for (name, _), grad in zip(named, grads, strict=True):
                if grad is not None:
                    scale[name] += abs(coefficient[i].item()) * grad.abs().max().item()
    return scale


def _same_step(full, chunked, case, tolerance=SAME, scale=None, gradients=None):
    for name in ("chosen_sum", "rejected_sum", "nll_sum"):
        assert torch.allclose(getattr(chunked[0], name), getattr(full[0], name),
                              rtol=tolerance, atol=0), name
    for name in ("chosen_count", "rejected_count", "nll_count"):
        assert torch.equal(getattr(chunked[0], name), getattr(full[0], name)), name
    assert chunked[1].item() == pytest.approx(full[1].item(), rel=tolerance)
    assert chunked[2] == pytest.approx(full[2], rel=tolerance, abs=1e-12)
    assert chunked[3].keys() == full[3].keys() and full[3]
    for name, grad in full[3].items():
        size = grad.abs().max().item() if scale is None else scale[name]
        bound = (tolerance if gradients is None else gradients) * max(size, 1e-3)
        assert (chunked[3][name] - grad).abs().max().item() <= bound, name
    if "head" in case or "full" in case:  # the head's own weights were trained and checked
        assert any("lm_head" in name or "embed_tokens" in name for name in full[3])


def _vocabulary_rows_saved(model, config, batch, chunk) -> int:
    """The most positions of any vocabulary-wide tensor autograd saved for a backward pass
    (the step's own, and those each chunk takes in its forward pass), weights left out."""
    vocab = model.get_base_model().config.vocab_size if hasattr(
        model, "get_base_model") else model.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = [0]

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights and vocab in tensor.shape:
            rows.append(tensor.numel() // vocab)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = forward_logps(model, batch, nll_covers_prompt(config), True, chunk)
        loss = preference_loss(config, logps).loss
        loss.backward()
    return max(rows)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_no_vocabulary_wide_tensor_of_the_batch_is_kept(models, finetune):
    config = train_config(model=models["untied"], precision="fp64", finetune=finetune,
                          lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    model = loop.load_model(config, torch.device("cpu"), None, None)
    batch = _batch(models["untied"])
    completion = int((batch["labels"][:, 1:] != -100).sum())
    # The full path saves logits of every position it keeps (at least every completion one).
    assert _vocabulary_rows_saved(model, config, batch, None) >= completion > CHUNK
    # Chunked: a chunk's worth at most, in the forward pass (a frozen head) or in the
    # backward pass's recomputation (a training head).
    assert _vocabulary_rows_saved(model, config, batch, CHUNK) <= CHUNK


def test_a_head_that_is_not_a_linear_map_is_not_chunked(models, caplog):
    config = train_config(model=models["untied"], precision="fp64",
                          lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    model = loop.load_model(config, torch.device("cpu"), None, None)
    model.get_base_model().config.final_logit_softcapping = 30.0  # as Gemma 2's
    with caplog.at_level(logging.WARNING, logger="cpo_data.training"):
        assert head_chunk(model, config) is None
    assert "computing full logits: LlamaForCausalLM's head applies final_logit_softcapping" \
        in caplog.text
    model.get_base_model().config.final_logit_softcapping = None
    assert head_chunk(model, config) == config.logps_chunk_tokens
    assert head_chunk(model, train_config(model=models["untied"],
                                          logps_chunk_tokens=None)) is None


def test_where_the_prompt_once_cannot_run_pairs_run_as_two_sequences(models, caplog):
    config, model = _model(models, "untied", "cpo sigmoid, lora")
    config = dataclasses.replace(config, prompt_once=True)
    base_model(model).config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="cpo_data.training"):
        assert not prompt_once(model, config)
    assert "runs flash_attention_2 attention, which takes no custom 4-D mask" in caplog.text
    base_model(model).config._attn_implementation = "sdpa"
    assert prompt_once(model, config)
    assert not prompt_once(model, train_config(model=models["untied"], prompt_once=False))
    # A pair whose two sequences do not share their prompt is not packed.
    batch = _batch(models["untied"])
    assert pack(batch, False) is not None
    pairs = batch["input_ids"].shape[0] // 2
    batch["input_ids"][pairs, 1] += 1
    assert pack(batch, False) is None
