"""Log-probabilities through the LM head in chunks (`training.chunked`) equal the full-logits
path: the same Logps, loss, metrics and gradients, for every loss, LoRA and full fine-tuning,
LoRA on the head, tied embeddings; and no vocabulary-sized tensor of the batch is kept."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer

from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from tests.conftest import train_config
from training import loop
from training.chunked import chunkable
from training.config import LoraSettings
from training.data import collate, tokenize_triplets
from training.forward import forward_logps, head_chunk, nll_covers_prompt, preference_loss

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


def _step(model, config, batch, chunk):
    """One step's Logps, loss, metrics and every trainable weight's gradient."""
    model.zero_grad(set_to_none=True)
    full = nll_covers_prompt(config)
    logps = forward_logps(model, batch, full, True, chunk)
    reference = None
    if config.loss == "dpo":
        from training.forward import reference_logps

        reference = reference_logps(model, batch, True, chunk)
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


@pytest.mark.parametrize("tie", ["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_equals_full_logits(models, case, tie):
    settings = dict(model=models[tie], precision="fp64", seed=0,
                    lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    settings.update(CASES[case])
    config = train_config(**settings)
    model = loop.load_model(config, torch.device("cpu"), None, None)
    with torch.no_grad():  # an adapter that changes the outputs (peft starts B at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    batch = _batch(models[tie])
    assert chunkable(model) is None
    full = _step(model, config, batch, None)
    chunked = _step(model, config, batch, CHUNK)
    for name in ("chosen_sum", "rejected_sum", "nll_sum"):
        assert torch.allclose(getattr(chunked[0], name), getattr(full[0], name),
                              rtol=SAME, atol=0), name
    assert torch.equal(chunked[0].chosen_count, full[0].chosen_count)
    assert torch.equal(chunked[0].nll_count, full[0].nll_count)
    assert chunked[1].item() == pytest.approx(full[1].item(), rel=SAME)
    assert chunked[2] == pytest.approx(full[2], rel=SAME, abs=1e-12)
    assert chunked[3].keys() == full[3].keys() and full[3]
    for name, grad in full[3].items():
        scale = grad.abs().max().item()
        assert (chunked[3][name] - grad).abs().max().item() <= SAME * max(scale, 1e-3), name
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
