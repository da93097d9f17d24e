"""Tests for orpo/loss.py: hand-worked values, float64 references, gradcheck, and the stability of log1mexp.

The formula under test (ORPO_SPEC.md, Hong et al. 2024):

    log_odds(y) = logp(y|x) - log(1 - exp(logp(y|x)))
    r           = log_odds(y_w) - log_odds(y_l)
    L_OR        = -logsigmoid(r)
    L           = nll_sum / num_nll_tokens + lambda * sum(L_OR) / num_pairs
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from orpo.loss import ORPOLoss, log1mexp, log_odds, odds_ratio_terms, orpo_loss, policy_logps, token_logps

LN2 = math.log(2.0)
IGNORE = -100


# ---- helpers -------------------------------------------------------------------------------------


def log1mexp_ref(a: float) -> float:
    """log(1 - e^a) in Python floats (float64), accurate to a few ulp for every a < 0.

    log(-expm1(a)) is the reference wherever it is well defined. Below -ln 2, 1 - e^a rounds towards 1,
    so log of it loses relative accuracy (it is exactly 0.0 for a < -37 while the true value is -e^a);
    there log1p(-exp(a)) is exact to a few ulp instead.
    """
    return math.log(-math.expm1(a)) if a > -LN2 else math.log1p(-math.exp(a))


def log_odds_ref(logp: torch.Tensor) -> torch.Tensor:
    """The spec's log_odds, element by element in float64, independent of the code under test."""
    return torch.tensor([a - log1mexp_ref(a) for a in logp.double().tolist()], dtype=torch.float64)


def or_loss_ref(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, -logsigmoid(r)) in float64, with -logsigmoid(r) = log1p(exp(-r)) written out stably."""
    r = log_odds_ref(chosen) - log_odds_ref(rejected)
    loss = torch.tensor(
        [math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x)) for x in r.tolist()],
        dtype=torch.float64,
    )
    return r, loss


def float32_neighbours(x: float) -> list[float]:
    """x rounded to float32 and the float32 values on either side of it."""
    t = torch.tensor(x, dtype=torch.float32)
    return [
        torch.nextafter(t, torch.tensor(-math.inf)).item(),
        t.item(),
        torch.nextafter(t, torch.tensor(math.inf)).item(),
    ]


def stress_grid(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logp over [-1e4, -1e-12] (dense logspace, both branches of log1mexp), -ln 2 and its float32
    neighbours, and the edge values 0.0, -0.0, -1e-30, -1e-40 (float32 subnormal)."""
    dense = -torch.logspace(-12, 4, 4001, dtype=torch.float64)
    edges = torch.tensor([0.0, -0.0, -1e-30, -1e-40, *float32_neighbours(-LN2)], dtype=torch.float64)
    return torch.cat([dense, edges]).to(dtype)


def nonfinite_points(fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """Mask of the points of `a` where fn(a) or d fn(a)/da (elementwise fn) is not finite."""
    a = a.detach().clone().requires_grad_(True)
    value = fn(a)
    (grad,) = torch.autograd.grad(value.sum(), a)
    return ~(torch.isfinite(value) & torch.isfinite(grad))


def naive_log1mexp(a: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - torch.exp(a))


def unclamped_where_log1mexp(a: torch.Tensor) -> torch.Tensor:
    """The right branches, but autograd still differentiates the unused one: 0 * inf = NaN near 0."""
    return torch.where(a > -LN2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def loop_policy_logps(
    logits: torch.Tensor, labels: torch.Tensor, nll_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen mean logps, rejected mean logps, nll_sum) by plain loops in float64.

    Position t's logits predict token t+1; a target of -100 is not scored.
    """
    logits = logits.double()
    pairs = nll_labels.shape[0]
    means = []
    for row in range(labels.shape[0]):
        scored = [
            torch.log_softmax(logits[row, t], dim=-1)[labels[row, t + 1]]
            for t in range(labels.shape[1] - 1)
            if labels[row, t + 1] != IGNORE
        ]
        means.append(torch.stack(scored).mean())
    nll_sum = torch.zeros((), dtype=torch.float64)
    for row in range(pairs):
        for t in range(nll_labels.shape[1] - 1):
            if nll_labels[row, t + 1] != IGNORE:
                nll_sum = nll_sum - torch.log_softmax(logits[row, t], dim=-1)[nll_labels[row, t + 1]]
    means_t = torch.stack(means)
    return means_t[:pairs], means_t[pairs:], nll_sum


def make_batch(
    pairs: int, seq_len: int, vocab: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits [2B, T, V] and collator-style rows, chosen first then rejected, right-padded.

    Returns (logits, input_ids, labels, attention_mask); labels hold the token ids of the response
    and -100 on the prompt and the padding. Prompt and response lengths differ from row to row.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    logits = (3 * torch.randn(rows, seq_len, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    labels = torch.full((rows, seq_len), IGNORE)
    attention_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    for row in range(rows):
        prompt_len = 1 + row % 3
        length = seq_len - (row % 2) * 2 - row // 3  # some rows padded, at least 2 response tokens
        assert length - prompt_len >= 1
        labels[row, prompt_len:length] = input_ids[row, prompt_len:length]
        attention_mask[row, :length] = 1
    return logits, input_ids, labels, attention_mask


# ---- 1. hand-worked values -----------------------------------------------------------------------


def hand_worked_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.tensor([math.log(1 / 2), math.log(1 / 5)])
    rejected = torch.tensor([math.log(1 / 4), math.log(4 / 5)])
    return chosen, rejected


def test_orpo_loss_hand_worked_values() -> None:
    """Two pairs, lambda = 0.1, nll_sum = 6 over 4 tokens (the local counts).

    With P = exp(logp), log_odds = log(P / (1 - P)):

        pair 1: P_w = 1/2 -> odds 1,   log_odds 0;     P_l = 1/4 -> odds 1/3, log_odds -log 3
                r1 = 0 - (-log 3) = log 3 = 1.0986
                L_OR1 = -logsigmoid(log 3) = log(1 + e^-log 3) = log(1 + 1/3) = log(4/3) = 0.28768
        pair 2: P_w = 1/5 -> odds 1/4, log_odds -log 4; P_l = 4/5 -> odds 4,  log_odds log 4
                r2 = -log 4 - log 4 = -log 16 = -2.7726
                L_OR2 = -logsigmoid(-log 16) = log(1 + 16) = log 17 = 2.8332

        nll_loss = 6 / 4 = 1.5
        or_loss  = 0.1 * (log(4/3) + log 17) / 2 = 0.05 * log(68/3) = 0.15605
        loss     = 1.5 + 0.15605 = 1.65605
    """
    chosen, rejected = hand_worked_inputs()
    out = orpo_loss(chosen, rejected, torch.tensor(6.0), num_nll_tokens=4, num_pairs=2, orpo_lambda=0.1)
    assert isinstance(out, ORPOLoss)

    torch.testing.assert_close(out.log_odds_ratio, torch.tensor([math.log(3), -math.log(16)]))
    torch.testing.assert_close(out.or_per_pair, torch.tensor([math.log(4 / 3), math.log(17)]))
    torch.testing.assert_close(out.nll_loss, torch.tensor(1.5))
    torch.testing.assert_close(out.or_loss, torch.tensor(0.05 * math.log(68 / 3)))
    torch.testing.assert_close(out.loss, torch.tensor(1.5 + 0.05 * math.log(68 / 3)))
    assert out.loss.shape == () and out.or_per_pair.shape == (2,)
    assert not out.log_odds_ratio.requires_grad and not out.or_per_pair.requires_grad


def test_orpo_loss_global_normalisation() -> None:
    """The same two pairs as one micro-batch of a step with 12 NLL tokens and 4 pairs in all:

        nll_loss = 6 / 12 = 0.5                      (a third of the local mean 1.5)
        or_loss  = 0.1 * (log(4/3) + log 17) / 4     (half of the local 0.15605) = 0.078026

    Split into halves (pair 1 with nll_sum 2.5 over its tokens, pair 2 with nll_sum 3.5), each
    normalised by the counts of the whole batch (4 tokens, 2 pairs), the contributions add up to
    the whole batch's loss (1.5 + 0.15605), and so do their gradients.
    """
    chosen, rejected = hand_worked_inputs()
    sum_or = math.log(4 / 3) + math.log(17)

    out = orpo_loss(chosen, rejected, torch.tensor(6.0), num_nll_tokens=12, num_pairs=4, orpo_lambda=0.1)
    torch.testing.assert_close(out.nll_loss, torch.tensor(0.5))
    torch.testing.assert_close(out.or_loss, torch.tensor(0.1 * sum_or / 4))
    torch.testing.assert_close(out.loss, torch.tensor(0.5 + 0.1 * sum_or / 4))
    # Counts given as tensors (as the collator builds them) give the same numbers.
    out_t = orpo_loss(chosen, rejected, torch.tensor(6.0), torch.tensor(12), torch.tensor(4), 0.1)
    torch.testing.assert_close(out_t.loss, out.loss)

    whole_c = chosen.clone().requires_grad_(True)
    whole_r = rejected.clone().requires_grad_(True)
    whole = orpo_loss(whole_c, whole_r, torch.tensor(6.0), num_nll_tokens=4, num_pairs=2, orpo_lambda=0.1)
    whole.loss.backward()

    half_c = [chosen[i : i + 1].clone().requires_grad_(True) for i in range(2)]
    half_r = [rejected[i : i + 1].clone().requires_grad_(True) for i in range(2)]
    halves = [
        orpo_loss(half_c[i], half_r[i], torch.tensor(nll), num_nll_tokens=4, num_pairs=2, orpo_lambda=0.1)
        for i, nll in enumerate([2.5, 3.5])
    ]
    for half in halves:
        half.loss.backward()

    torch.testing.assert_close(halves[0].loss + halves[1].loss, whole.loss)
    torch.testing.assert_close(halves[0].loss + halves[1].loss, torch.tensor(1.5 + 0.1 * sum_or / 2))
    torch.testing.assert_close(halves[0].nll_loss + halves[1].nll_loss, whole.nll_loss)
    torch.testing.assert_close(halves[0].or_loss + halves[1].or_loss, whole.or_loss)
    torch.testing.assert_close(torch.cat([h.log_odds_ratio for h in halves]), whole.log_odds_ratio)
    torch.testing.assert_close(torch.cat([c.grad for c in half_c]), whole_c.grad)
    torch.testing.assert_close(torch.cat([r.grad for r in half_r]), whole_r.grad)


# ---- 2. float64 reference of the formula ---------------------------------------------------------


def test_or_terms_match_float64_reference() -> None:
    """float32 log_odds, r and -logsigmoid(r) against the spec's formula in float64, logp in [-20, -1e-3].

    Inputs are float32 values, so both sides see the same numbers. log_odds crosses 0 at logp = -ln 2
    (1 - P = P), where float32 cancellation leaves an absolute error of a few float32 ulp of ln 2,
    hence atol 1e-6 next to rtol 1e-5; -logsigmoid(r) is positive and compared relatively only.
    """
    grid = -torch.logspace(-3, math.log10(20.0), 2001, dtype=torch.float32)
    torch.testing.assert_close(log_odds(grid).double(), log_odds_ref(grid), rtol=1e-5, atol=1e-6)

    gen = torch.Generator().manual_seed(0)
    chosen = torch.cat([grid, grid[torch.randperm(len(grid), generator=gen)]])
    rejected = torch.cat([grid.flip(0), grid[torch.randperm(len(grid), generator=gen)]])
    terms = odds_ratio_terms(chosen, rejected)
    r_ref, loss_ref = or_loss_ref(chosen, rejected)
    assert terms.or_loss.dtype == torch.float32
    torch.testing.assert_close(terms.log_odds_ratio.double(), r_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(terms.or_loss.double(), loss_ref, rtol=1e-5, atol=0.0)

    out = orpo_loss(chosen, rejected, torch.tensor(3.0), num_nll_tokens=7, num_pairs=len(chosen), orpo_lambda=0.25)
    torch.testing.assert_close(out.loss.double(), 3.0 / 7 + 0.25 * loss_ref.mean(), rtol=1e-5, atol=0.0)


# ---- 3. gradcheck --------------------------------------------------------------------------------

# Both sides of the branch point -ln 2, never within gradcheck's eps (1e-6) of it or of the clamp near 0.
GRADCHECK_POINTS = [-30.0, -5.0, -1.0, -LN2 - 1e-3, -LN2 + 1e-3, -0.5, -0.1, -1e-2, -1e-4]


def test_gradcheck_log1mexp() -> None:
    a = torch.tensor(GRADCHECK_POINTS, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log1mexp, (a,))
    # The analytic derivative, d/da log(1 - e^a) = -e^a / (1 - e^a) = 1 / (1 - e^-a), as a second check.
    (grad,) = torch.autograd.grad(log1mexp(a).sum(), a)
    torch.testing.assert_close(grad, 1 / (1 - torch.exp(-a.detach())))


def test_gradcheck_or_loss() -> None:
    """Pairs with chosen and rejected on either side of -ln 2, in every combination."""
    chosen = torch.tensor(GRADCHECK_POINTS, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(GRADCHECK_POINTS[::-1], dtype=torch.float64).roll(2).requires_grad_(True)
    nll_sum = torch.tensor(4.0, dtype=torch.float64)

    def or_terms(c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(odds_ratio_terms(c, r))

    def total_loss(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return orpo_loss(c, r, nll_sum, num_nll_tokens=5, num_pairs=12, orpo_lambda=0.1).loss

    assert torch.autograd.gradcheck(or_terms, (chosen, rejected))
    assert torch.autograd.gradcheck(total_loss, (chosen, rejected))


# ---- 4. finite everywhere, and the naive forms are not ------------------------------------------


def test_finite_loss_and_gradients_float32() -> None:
    grid = stress_grid(torch.float32)
    assert not nonfinite_points(log1mexp, grid).any()
    assert not nonfinite_points(log_odds, grid).any()

    n = len(grid)
    for shift in (0, 1, n // 3, n // 2):
        chosen = grid.clone().requires_grad_(True)
        rejected = grid.roll(shift).clone().requires_grad_(True)
        out = orpo_loss(chosen, rejected, torch.tensor(2.0), num_nll_tokens=3, num_pairs=n, orpo_lambda=0.1)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(out.log_odds_ratio).all() and torch.isfinite(out.or_per_pair).all()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()

    # logp = 0 (P = 1) is held at -1e-30: log1mexp(0) = log1mexp(-1e-30) = log(1e-30) = -69.08.
    edge = log1mexp(torch.tensor([0.0, -1e-30]))
    torch.testing.assert_close(edge, torch.full((2,), math.log(1e-30)))


def test_naive_log1mexp_fails_on_the_same_grid() -> None:
    """The check above can fail: the naive form gives -inf (then NaN), the unclamped torch.where NaN grads."""
    grid = stress_grid(torch.float32)
    assert nonfinite_points(naive_log1mexp, grid).any()
    assert nonfinite_points(lambda p: p - naive_log1mexp(p), grid).any()

    # Its values are finite away from 0, yet its gradient is NaN: only the gradient check catches it.
    away_from_zero = grid[grid < -1e-30]
    assert torch.isfinite(unclamped_where_log1mexp(away_from_zero)).all()
    assert nonfinite_points(unclamped_where_log1mexp, away_from_zero).any()


def test_bf16_inputs_upcast_to_float32() -> None:
    grid = stress_grid(torch.bfloat16)
    assert log_odds(grid).dtype == torch.float32
    torch.testing.assert_close(log_odds(grid), log_odds(grid.float()), rtol=0, atol=0)
    assert not nonfinite_points(log_odds, grid).any()

    chosen = grid.clone().requires_grad_(True)
    rejected = grid.flip(0).clone().requires_grad_(True)
    out = orpo_loss(chosen, rejected, torch.tensor(2.0, dtype=torch.bfloat16), 3, len(grid), 0.1)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.or_per_pair.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.or_per_pair).all()
    assert chosen.grad.dtype == torch.bfloat16
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()

    ref = orpo_loss(grid.float(), grid.flip(0).float(), torch.tensor(2.0), 3, len(grid), 0.1)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


# ---- 5. log1mexp against float64 -----------------------------------------------------------------


def test_log1mexp_matches_float64_reference() -> None:
    """Relative 1e-6 over [-1e4, -1e-30] in float32.

    Below about -87 the result, -e^a, is a float32 subnormal (or 0 below -104) and cannot carry relative
    precision, hence the absolute floor at float32's smallest normal number.
    """
    a = torch.cat([-torch.logspace(-30, 4, 20001, dtype=torch.float32), torch.tensor(float32_neighbours(-LN2))])
    ref = torch.tensor([log1mexp_ref(x) for x in a.double().tolist()], dtype=torch.float64)
    got = log1mexp(a)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=torch.finfo(torch.float32).tiny)
    # The reference against itself: both float64 forms agree where both are accurate.
    for x in (-0.7, -1.0, -3.0, -10.0):
        assert math.isclose(math.log(-math.expm1(x)), math.log1p(-math.exp(x)), rel_tol=1e-9)


# ---- 6. policy_logps -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_policy_logps_matches_loop_reference(dtype: torch.dtype) -> None:
    pairs = 3
    logits, _, labels, _ = make_batch(pairs, seq_len=9, vocab=13, dtype=dtype, seed=1)
    nll_labels = labels[:pairs].clone()
    leaf = logits.clone().requires_grad_(True)

    got = policy_logps(leaf, labels, nll_labels)
    chosen_ref, rejected_ref, nll_ref = loop_policy_logps(logits, labels, nll_labels)
    assert got.chosen_logps.shape == (pairs,) and got.rejected_logps.shape == (pairs,) and got.nll_sum.shape == ()
    torch.testing.assert_close(got.chosen_logps.double(), chosen_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.rejected_logps.double(), rejected_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.nll_sum.double(), nll_ref, rtol=1e-5, atol=1e-6)
    # L_SFT without the prompt is the summed NLL of the chosen responses: mean logp times token count.
    counts = (labels[:pairs, 1:] != IGNORE).sum(-1).double()
    torch.testing.assert_close(got.nll_sum.double(), -(chosen_ref * counts).sum(), rtol=1e-5, atol=1e-6)

    # Logits at positions that score nothing (the one before each prompt token, padding) get no gradient.
    (got.chosen_logps.sum() + 2 * got.rejected_logps.sum() + got.nll_sum).backward()
    scored = torch.zeros(labels.shape, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE
    assert (leaf.grad[~scored] == 0).all()
    assert (leaf.grad[scored].abs().sum(-1) > 0).all()


def test_policy_logps_nll_on_prompt() -> None:
    """nll_labels != labels[:B]: the prompt tokens of the chosen rows (after the first) are scored too."""
    pairs = 2
    logits, input_ids, labels, attention_mask = make_batch(pairs, seq_len=8, vocab=11, dtype=torch.float64, seed=2)
    nll_labels = torch.where(attention_mask[:pairs].bool(), input_ids[:pairs], IGNORE)
    nll_labels[:, 0] = IGNORE
    assert not torch.equal(nll_labels, labels[:pairs])

    got = policy_logps(logits, labels, nll_labels)
    chosen_ref, rejected_ref, nll_ref = loop_policy_logps(logits, labels, nll_labels)
    torch.testing.assert_close(got.chosen_logps.double(), chosen_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.rejected_logps.double(), rejected_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.nll_sum.double(), nll_ref, rtol=1e-5, atol=1e-6)

    # The prompt adds to the NLL: strictly more than the response-only NLL of the same rows.
    response_only = policy_logps(logits, labels, labels[:pairs].clone()).nll_sum
    assert got.nll_sum > response_only + 1e-3


# ---- 7. token_logps ------------------------------------------------------------------------------


def test_token_logps_matches_log_softmax_gather() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(3, 5, 17, generator=gen)
    targets = torch.randint(0, 17, (3, 5), generator=gen)
    got = token_logps(logits, targets)
    ref = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))


def test_token_logps_bf16_logits_give_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = (4 * torch.randn(2, 6, 19, generator=gen)).bfloat16()
    targets = torch.randint(0, 19, (2, 6), generator=gen)
    got = token_logps(logits, targets)
    assert got.dtype == torch.float32
    # Computed from the bf16 values in float32, not rounded back to bf16.
    ref = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, token_logps(logits.float(), targets), rtol=0, atol=0)
