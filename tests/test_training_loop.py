"""The training loop on a tiny local Llama: what it updates, how it scales, how it resumes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from tests.conftest import train_config
from training import loop
from training.checkpoint import checkpoints, read_state
from training.config import EvalConfig, LoraSettings, TrainConfig
from training.data import collate, tokenize_triplets
from training.forward import forward_logps, reference_logps
from training.loop import TrainingDiverged, TrainingError, train

TIMING = ("tokens_per_second", "peak_memory_mb")
# Two ways of computing one step that are the same mechanism (another micro-batch split,
# recomputed activations) run in float64 (`precision: fp64`): they differ only in summation
# order, a few thousand float64 roundings (1.1e-16 each) deep in this tiny model, so n * u
# bounds the relative difference near 1e-12 on any CPU, where float32 differences of ~1e-6
# depend on the CPU's kernels. A mechanism mistake (a per-micro-batch token mean, a token too
# many or too few) moves the loss by more than 1e-3.
SAME = 1e-10
# Adam divides a gradient by its own running size (plus eps 1e-8), so rounding noise in a
# gradient that is zero in exact arithmetic (~1e-17 here) can move a weight by up to
# lr * noise / eps = 1e-2 * 1e-17 / 1e-8 = 1e-11; a scaling mistake moves it by ~lr (1e-2).
SAME_WEIGHTS = 1e-9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("model") / "llama"))


@pytest.fixture(scope="module")
def triplets() -> list[dict]:
    """12 triplets whose chosen completions have different lengths, so that micro-batches of
    one step hold different numbers of tokens (where loss scaling mistakes show)."""
    rows = sample_triplets(rows_per_pair=6).to_pylist()
    for number, row in enumerate(rows):
        row["chosen"] = " ".join(["good translation"] * (1 + 3 * (number % 4)))
    return rows


def make_config(model_dir: str, **changes) -> TrainConfig:
    settings = dict(model=model_dir, batch_size=2, max_steps=3, learning_rate=1e-2,
                    lr_scheduler="constant", warmup_ratio=0.0, seed=0,
                    lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    settings.update(changes)
    return train_config(**settings)


def capture_models(monkeypatch) -> list:
    """Keep each model the loop loads (and its parameters as loaded) for inspection."""
    models = []
    load_model = loop.load_model

    def keep(*args, **kwargs):
        model = load_model(*args, **kwargs)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        models.append((model, initial))
        return model

    monkeypatch.setattr(loop, "load_model", keep)
    return models


def step_metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def test_three_lora_steps_update_the_adapter_only(model_dir, triplets, tmp_path, monkeypatch):
    models = capture_models(monkeypatch)
    result = train(make_config(model_dir), triplets, tmp_path / "run", progress=False)

    assert result.steps == 3 and len(step_metrics(tmp_path / "run")) == 3
    (model, initial), = models
    on_disk = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    lora, base = 0, 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            lora += 1
            assert parameter.requires_grad
            assert not torch.equal(parameter, initial[name]), f"{name} did not change"
        else:
            base += 1
            assert not parameter.requires_grad
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(parameter, on_disk[plain]), f"{name} changed"
    assert lora == 2 * 2 * 2  # q_proj and v_proj (peft's Llama default) x 2 layers x (A, B)
    assert base == len(on_disk)
    # The saved adapter holds exactly the trained LoRA weights.
    saved = load_file(f"{result.model_dir}/adapter_model.safetensors")
    assert len(saved) == lora and all("lora_" in key for key in saved)
    trained = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    for key, value in saved.items():
        assert torch.equal(value, trained[key])


def test_loss_falls_on_a_fixed_batch(model_dir, triplets, tmp_path):
    config = make_config(model_dir, batch_size=4, max_steps=20, finetune="full",
                         learning_rate=3e-3)
    train(config, triplets[:4], tmp_path / "run", progress=False)  # every step: these 4 pairs
    metrics = step_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 20
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]


@pytest.mark.parametrize("loss", ["cpo", "orpo"])
def test_two_micro_batches_of_two_equal_one_batch_of_four(model_dir, triplets, tmp_path,
                                                          monkeypatch, loss):
    """Same examples per step, different split: same loss, gradient norm and weights. The
    micro-batches hold different token counts, so a per-micro-batch token mean would differ."""
    models = capture_models(monkeypatch)
    common = dict(finetune="full", max_steps=2, max_grad_norm=0.0, loss=loss, precision="fp64")
    train(make_config(model_dir, batch_size=4, gradient_accumulation_steps=1, **common),
          triplets[:8], tmp_path / "one", progress=False)
    train(make_config(model_dir, batch_size=2, gradient_accumulation_steps=2, **common),
          triplets[:8], tmp_path / "two", progress=False)

    for whole, split in zip(step_metrics(tmp_path / "one"), step_metrics(tmp_path / "two"),
                            strict=True):
        assert whole["tokens"] == split["tokens"]
        for key in ("loss", "nll_loss", "grad_norm", "rewards/margins"):
            assert split[key] == pytest.approx(whole[key], rel=SAME), key
    (one, _), (two, _) = models
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, atol=SAME_WEIGHTS, rtol=0), name


def test_a_resumed_run_continues_exactly(model_dir, triplets, tmp_path):
    config = make_config(model_dir, max_steps=6, save_steps=3,
                         lora=LoraSettings(rank=4, alpha=8, dropout=0.2))  # dropout uses RNG
    straight = train(config, triplets, tmp_path / "straight", progress=False)

    class Crash(Exception):
        pass

    def crash_after_step_4(step, metrics):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(config, triplets, tmp_path / "resumed", progress=False,
              on_step=crash_after_step_4)
    assert [read_state(c)["step"] for c in checkpoints(tmp_path / "resumed")] == [3]
    resumed = train(config, triplets, tmp_path / "resumed", progress=False)

    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    expected = [{k: v for k, v in m.items() if k not in TIMING}
                for m in step_metrics(tmp_path / "straight")]
    got = [{k: v for k, v in m.items() if k not in TIMING}
           for m in step_metrics(tmp_path / "resumed")]
    assert got == expected  # steps 1-3 from the first attempt, 4-6 after the resume
    a = load_file(f"{straight.model_dir}/adapter_model.safetensors")
    b = load_file(f"{resumed.model_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_made_with_other_settings(model_dir, triplets, tmp_path):
    train(make_config(model_dir, max_steps=2), triplets, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match=r"checkpoint-2: was trained with other settings "
                       r"\(optimizer\.learning_rate\)"):
        train(make_config(model_dir, max_steps=2, learning_rate=5e-3), triplets,
              tmp_path / "run", progress=False)
    # resume: false starts over instead
    result = train(make_config(model_dir, max_steps=2, learning_rate=5e-3, resume=False),
                   triplets, tmp_path / "run", progress=False)
    assert result.resumed_from_step == 0 and len(step_metrics(tmp_path / "run")) == 2


def test_dpo_reference_is_the_model_with_its_adapter_off(model_dir, triplets):
    config = make_config(model_dir, loss="dpo", precision="fp64")
    model = loop.load_model(config, torch.device("cpu"), None, None).eval()
    with torch.no_grad():  # an adapter that changes the outputs
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_triplets(tokenizer, triplets[:3])
    batch = collate(examples, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    with torch.no_grad():
        policy = forward_logps(model, batch, False, True)
        reference = reference_logps(model, batch, True)
        policy_again = forward_logps(model, batch, False, True)
        expected = forward_logps(base, batch, False, True)
    assert reference.chosen_sum.dtype == torch.float64
    assert torch.allclose(reference.chosen_sum, expected.chosen_sum, rtol=SAME, atol=0)
    assert torch.allclose(reference.rejected_sum, expected.rejected_sum, rtol=SAME, atol=0)
    assert (policy.chosen_sum - reference.chosen_sum).abs().min() > 1e-2
    assert torch.equal(policy.chosen_sum, policy_again.chosen_sum)  # adapter back on


def test_dpo_starts_at_log_2_because_policy_and_reference_agree(model_dir, triplets, tmp_path):
    """peft starts lora_B at zero: at step 1 the policy is the reference, rewards are 0."""
    train(make_config(model_dir, loss="dpo", max_steps=2), triplets, tmp_path / "run",
          progress=False)
    first, second = step_metrics(tmp_path / "run")
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["rewards/margins"] != 0


def test_no_triplets_or_too_many_held_out_is_refused(model_dir, triplets, tmp_path):
    with pytest.raises(TrainingError, match="no triplets"):
        train(make_config(model_dir), [], tmp_path / "run", progress=False)
    config = make_config(model_dir, eval=EvalConfig(held_out=12))
    with pytest.raises(TrainingError, match="eval.held_out: 12 held-out triplets leave none"):
        train(config, triplets, tmp_path / "run", progress=False)


def test_held_out_triplets_are_evaluated_not_trained_on(model_dir, triplets, tmp_path):
    config = make_config(model_dir, max_steps=4, eval=EvalConfig(held_out=4, every_steps=2))
    result = train(config, triplets, tmp_path / "run", progress=False)
    assert result.train_rows == 8 and result.held_out_rows == 4
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[-1] == {"step": 4, **result.eval_metrics}
    assert 0 <= result.eval_metrics["eval/rewards/accuracies"] <= 1


def test_a_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, triplets, caplog):
    folder = build_tiny_causal_lm(tmp_path / "nopad")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None

    result = train(make_config(str(folder), max_steps=1), triplets, tmp_path / "run",
                   progress=False)
    assert len(result.notes) == 1 and "no pad token: padding with EOS" in result.notes[0]
    assert "no pad token" in caplog.text
    assert math.isfinite(result.last_metrics["loss"])


def test_nan_loss_stops_and_keeps_the_last_good_weights(model_dir, triplets, tmp_path,
                                                         monkeypatch):
    load_model = loop.load_model
    forwards = []

    def poisoned(*args, **kwargs):
        model = load_model(*args, **kwargs)

        def hook(module, inputs, output):
            forwards.append(1)
            if len(forwards) == 3:  # the third step (one forward pass per step)
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        # On the decoder, which both ways of computing log-probabilities run.
        model.get_base_model().get_decoder().register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "load_model", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3: training stopped; "
                       r"the last good weights \(after step 2\) are in .*checkpoint-2") as error:
        train(make_config(model_dir, max_steps=5), triplets, tmp_path / "run", progress=False)
    assert error.value.step == 3
    assert [read_state(c)["step"] for c in checkpoints(tmp_path / "run")] == [2]
    assert len(step_metrics(tmp_path / "run")) == 2
    assert not (tmp_path / "run" / "final").exists()


def test_gradient_checkpointing_gives_the_same_step(model_dir, triplets, tmp_path):
    plain = make_config(model_dir, max_steps=2, precision="fp64")
    checkpointed = dataclasses.replace(plain, gradient_checkpointing=True)
    train(plain, triplets, tmp_path / "plain", progress=False)
    train(checkpointed, triplets, tmp_path / "ckpt", progress=False)
    for a, b in zip(step_metrics(tmp_path / "plain"), step_metrics(tmp_path / "ckpt"),
                    strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=SAME)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=SAME)


def test_a_finished_run_rerun_trains_nothing_and_keeps_one_closing_evaluation(
        model_dir, triplets, tmp_path):
    config = make_config(model_dir, max_steps=2, eval=EvalConfig(held_out=2))
    first = train(config, triplets, tmp_path / "run", progress=False)
    again = train(config, triplets, tmp_path / "run", progress=False)
    assert again.resumed_from_step == 2 and again.eval_metrics == first.eval_metrics
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], "eval/loss" in x) for x in lines] == [(1, False), (2, False), (2, True)]


def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapter_in_float32(
        model_dir, triplets, tmp_path, monkeypatch):
    """The GPU path (bf16 autocast), run on CPU, where torch autocasts to bf16 as well."""
    models = capture_models(monkeypatch)
    result = train(make_config(model_dir, precision="bf16", max_steps=2), triplets,
                   tmp_path / "run", progress=False)
    (model, initial), = models
    dtypes = {("lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert math.isfinite(result.last_metrics["loss"])
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters()
               if "lora_B" in n)


@pytest.mark.parametrize(("schedule", "after_warm_up"), [
    # lr multiplier at 0-based step k after 2 warm-up steps of 8 (transformers' formulas)
    ("linear", lambda k: (8 - k) / 6),
    ("cosine", lambda k: 0.5 * (1 + math.cos(math.pi * (k - 2) / 6))),
    ("inverse_sqrt", lambda k: math.sqrt(2 / k)),
    ("constant", lambda k: 1.0),
])
def test_learning_rate_warms_up_then_follows_the_schedule(model_dir, triplets, tmp_path,
                                                          schedule, after_warm_up):
    config = make_config(model_dir, max_steps=8, lr_scheduler=schedule, warmup_ratio=0.25,
                         learning_rate=1e-3)
    train(config, triplets, tmp_path / "run", progress=False)
    rates = [m["learning_rate"] for m in step_metrics(tmp_path / "run")]
    expected = [0.0, 0.5e-3] + [1e-3 * after_warm_up(k) for k in range(2, 8)]
    assert rates == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("loss", ["cpo", "orpo", "dpo"])
def test_the_lean_paths_give_the_earlier_paths_step(model_dir, triplets, tmp_path, loss):
    """The LM head in chunks and the prompt once (the defaults) against full logits and two
    sequences, through the loop with gradient accumulation: one step's loss, NLL, rewards and
    gradient norm."""
    common = dict(max_steps=1, max_grad_norm=0.0, loss=loss, precision="fp64", batch_size=2,
                  gradient_accumulation_steps=2)
    if loss != "dpo":
        common["finetune"] = "full"
    train(make_config(model_dir, **common), triplets[:4], tmp_path / "new", progress=False)
    train(make_config(model_dir, logps_chunk_tokens=None, prompt_once=False, **common),
          triplets[:4], tmp_path / "old", progress=False)
    (new,), (old,) = step_metrics(tmp_path / "new"), step_metrics(tmp_path / "old")
    assert new["tokens"] == old["tokens"]
    for key in ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert new[key] == pytest.approx(old[key], rel=SAME), key
    # The gradient's float32 roundings at Llama's RMSNorm (tests/test_chunked_logps.py,
    # PACKED_GRADIENTS) bound its norm's difference.
    assert new["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-6)
