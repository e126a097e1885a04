"""Each loss against numbers worked out by hand (the arithmetic is in each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    completion_logps,
    cpo_loss,
    dpo_loss,
    log1mexp,
    orpo_loss,
)

# The losses run in float32 on one-element tensors, a handful of elementwise operations deep:
# each within a few float32 ulps (1.2e-7 relative, whatever the CPU's vector math library),
# on values near 1, and the hand-worked constants are rounded to 7 decimals (5e-8). So
# abs=1e-6 holds on any CPU, and a wrong formula moves a value by far more.
# One pair: chosen completion 4 tokens summing to -2.0, rejected 5 tokens summing to -5.0.
CHOSEN, REJECTED = torch.tensor([-2.0]), torch.tensor([-5.0])
N_CHOSEN, N_REJECTED = torch.tensor([4]), torch.tensor([5])


def _cpo(**options):
    return cpo_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, **options)


def test_cpo_sigmoid():
    """delta = -2 - (-5) = 3 (sums); beta*delta = 0.3; -log sigmoid(0.3) = log(1 + e^-0.3)
    = log(1.7408182) = 0.5543552. NLL = 2/4 = 0.5. L = 0.5543552 + 1.0 * 0.5 = 1.0543552."""
    out = _cpo()
    assert out.loss.item() == pytest.approx(1.0543552, abs=1e-6)
    assert out.metrics["nll_loss"] == pytest.approx(0.5)
    assert out.metrics["rewards/chosen"] == pytest.approx(-0.2)    # 0.1 * -2
    assert out.metrics["rewards/rejected"] == pytest.approx(-0.5)  # 0.1 * -5
    assert out.metrics["rewards/margins"] == pytest.approx(0.3)
    assert out.metrics["rewards/accuracies"] == 1.0
    assert out.metrics["logps/chosen"] == -2.0 and out.metrics["logps/rejected"] == -5.0
    # cpo_alpha scales only the NLL: alpha 0 leaves 0.5543552, alpha 2 gives 1.5543552.
    assert _cpo(cpo_alpha=0.0).loss.item() == pytest.approx(0.5543552, abs=1e-6)
    assert _cpo(cpo_alpha=2.0).loss.item() == pytest.approx(1.5543552, abs=1e-6)


def test_cpo_sigmoid_with_label_smoothing():
    """eps = 0.1: 0.9 * log(1 + e^-0.3) + 0.1 * log(1 + e^0.3) = 0.9 * 0.5543552
    + 0.1 * 0.8543552 = 0.4989197 + 0.0854355 = 0.5843552; plus NLL 0.5 = 1.0843552."""
    assert _cpo(label_smoothing=0.1).loss.item() == pytest.approx(1.0843552, abs=1e-6)


def test_cpo_hinge():
    """relu(1 - 0.1 * 3) = 0.7; plus NLL 0.5 = 1.2. With beta 0.5: relu(1 - 1.5) = 0 -> 0.5."""
    assert _cpo(loss_type="hinge").loss.item() == pytest.approx(1.2)
    assert _cpo(loss_type="hinge", beta=0.5).loss.item() == pytest.approx(0.5)


def test_cpo_ipo_uses_token_means():
    """Means: chosen -2/4 = -0.5, rejected -5/5 = -1.0, delta = 0.5. 1/(2*0.1) = 5.
    (0.5 - 5)^2 = 20.25; plus NLL 0.5 = 20.75. rewards/chosen = 0.1 * -0.5 = -0.05."""
    out = _cpo(loss_type="ipo")
    assert out.loss.item() == pytest.approx(20.75)
    assert out.metrics["rewards/chosen"] == pytest.approx(-0.05)
    assert out.metrics["logps/rejected"] == pytest.approx(-1.0)


def test_cpo_simpo_subtracts_the_target_margin():
    """Means: delta = 0.5. gamma/beta = 0.5/0.1 = 5: beta*(0.5 - 5) = -0.45;
    -log sigmoid(-0.45) = log(1 + e^0.45) = log(2.5683122) = 0.9432489; plus 0.5 = 1.4432489."""
    assert _cpo(loss_type="simpo").loss.item() == pytest.approx(1.4432489, abs=1e-6)


def test_nll_is_the_token_mean_over_the_batch_not_the_mean_of_means():
    """Two pairs: chosen sums -2 (4 tokens) and -6 (2 tokens). Token mean = 8/6 = 1.3333333;
    the mean of per-pair means would be (0.5 + 3) / 2 = 1.75."""
    out = cpo_loss(torch.tensor([-2.0, -6.0]), torch.tensor([-5.0, -7.0]),
                   torch.tensor([4, 2]), torch.tensor([5, 3]), cpo_alpha=1.0)
    assert out.metrics["nll_loss"] == pytest.approx(8 / 6)
    # rewards/accuracies: pair 2's chosen reward -0.6 > rejected -0.7: both right.
    assert out.metrics["rewards/accuracies"] == 1.0


def test_orpo():
    """Means: chosen -0.5, rejected -1.0.
    log odds(-0.5) = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.3934693) = -0.5 + 0.9327521
    = 0.4327521; log odds(-1.0) = -1 - log(1 - e^-1) = -1 - log(0.6321206) = -1 + 0.4586751
    = -0.5413249. Ratio = 0.9740770; log sigmoid(0.9740770) = -log(1 + e^-0.9740770)
    = -log(1.3775407) = -0.3202998. With nll 0.5, lambda 0.1: 0.5 + 0.0320300 = 0.5320300."""
    out = orpo_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, torch.tensor(0.5), lam=0.1)
    assert out.metrics["log_odds_chosen"] == pytest.approx(0.9740770, abs=1e-6)
    assert out.metrics["log_odds_ratio"] == pytest.approx(-0.3202998, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5320300, abs=1e-6)


def test_orpo_is_finite_when_the_policy_is_confident():
    """Mean log-probs of -1e-9 (p = 1 - 1e-9): the naive log(1 - exp(x)) is log(0) in float32."""
    chosen = torch.tensor([-1e-9 * 4], requires_grad=True)
    out = orpo_loss(chosen, torch.tensor([-1e-8 * 5]), N_CHOSEN, N_REJECTED,
                    torch.tensor(0.1), lam=0.1)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(chosen.grad).all()
    x = torch.tensor([-1e-7, -0.1, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x.float()).double(), torch.log(1 - torch.exp(x)), rtol=1e-5)


def test_dpo():
    """Policy sums -2/-5, reference sums -3/-4: chosen reward 0.1 * (-2 + 3) = 0.1, rejected
    0.1 * (-5 + 4) = -0.1; -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389."""
    out = dpo_loss(CHOSEN, REJECTED, torch.tensor([-3.0]), torch.tensor([-4.0]), N_CHOSEN)
    assert out.loss.item() == pytest.approx(0.5981389, abs=1e-6)
    assert out.metrics["rewards/margins"] == pytest.approx(0.2)
    assert out.metrics["nll_loss"] == pytest.approx(0.5)  # reported, not added


def test_completion_logps_skips_prompt_and_padding():
    """Vocabulary of 2. Logits make token 1 have probability e^1/(e^0+e^1) = 0.7310586 at
    every position, so log p(1) = -0.3132617 and log p(0) = -1.3132617. Labels [prompt, prompt,
    1, 0, pad]: predicted positions are 2 and 3 (shifted by one): -0.3132617 - 1.3132617
    = -1.6265234 over 2 tokens."""
    logits = torch.tensor([[[0.0, 1.0]] * 5])
    labels = torch.tensor([[-100, -100, 1, 0, -100]])
    total, count = completion_logps(logits, labels)
    assert total.item() == pytest.approx(-1.6265234, abs=1e-6) and count.item() == 2


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        _cpo(loss_type="kto")
