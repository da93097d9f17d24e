"""The ORPO objective as pure functions of tensors (see ../shared/ORPO_SPEC.md).

For one pair (prompt x, chosen y_w, rejected y_l):

    logp(y|x)   = (1/|y|) * sum_t log P(y_t | x, y_<t)        mean over response tokens, EOS included
    log_odds(y) = logp(y|x) - log(1 - exp(logp(y|x)))
    r           = log_odds(y_w) - log_odds(y_l)
    L_OR        = -logsigmoid(r)
    L           = L_SFT + lambda * L_OR

L_SFT is the token mean of the chosen sequences' NLL and L_OR the mean over pairs, both over the
*global* batch (every micro-batch of the optimizer step, on every rank). A micro-batch therefore
contributes `nll_sum / global_nll_tokens + lambda * sum(L_OR) / global_pairs`; summing those
contributions over the step gives exactly L, however the batch is split.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)
# Largest log-prob kept: logp = 0 would mean P = 1 and infinite odds. -1e-30 is representable in
# float32 (normal range ends near -1.2e-38) and keeps log1mexp finite (about -69).
_MAX_LOGP = -1e-30


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stable in value *and* gradient (Maechler 2012).

    Near 0 use log(-expm1(a)); below -ln 2 use log1p(-exp(a)). `torch.where` differentiates both
    branches, so each branch's input is clamped to its own side of -ln 2: the unused branch then
    sees a harmless value and contributes a finite zero to the gradient instead of 0 * inf = NaN.
    """
    a = a.clamp(max=_MAX_LOGP)
    near_zero = a > -_LN2
    a_near = a.clamp(min=-_LN2)  # input to the branch used near 0
    a_far = a.clamp(max=-_LN2)  # input to the branch used far from 0
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(logp), in float32 at least."""
    logp = _at_least_float32(logp)
    return logp - log1mexp(logp)


class PairTerms(NamedTuple):
    """Per-pair quantities, each of shape [pairs]."""

    log_odds_ratio: torch.Tensor  # r = log_odds(y_w) - log_odds(y_l)
    or_loss: torch.Tensor  # -logsigmoid(r), before lambda


def odds_ratio_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> PairTerms:
    """r and -logsigmoid(r) from the length-normalised log-probs of each pair, shapes [pairs]."""
    r = log_odds(chosen_logps) - log_odds(rejected_logps)
    return PairTerms(log_odds_ratio=r, or_loss=-F.logsigmoid(r))


class ORPOLoss(NamedTuple):
    """One micro-batch's share of the step's loss, plus what the metrics need.

    `loss`, `nll_loss` and `or_loss` are this micro-batch's *contributions*: they sum to the global
    values over the micro-batches and ranks of an optimizer step. The per-pair tensors are detached.
    """

    loss: torch.Tensor  # scalar, = nll_loss + or_loss
    nll_loss: torch.Tensor  # scalar, nll_sum / num_nll_tokens
    or_loss: torch.Tensor  # scalar, lambda * sum(-logsigmoid(r)) / num_pairs
    log_odds_ratio: torch.Tensor  # [pairs], r
    or_per_pair: torch.Tensor  # [pairs], -logsigmoid(r)


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_sum: torch.Tensor,
    num_nll_tokens: int | torch.Tensor,
    num_pairs: int | torch.Tensor,
    orpo_lambda: float,
) -> ORPOLoss:
    """ORPO loss of a micro-batch, normalised by global counts.

    Args:
        chosen_logps, rejected_logps: [pairs] mean response log-probs logp(y|x) (any float dtype;
            computed in float32).
        nll_sum: scalar, summed NLL of the tokens L_SFT covers in this micro-batch.
        num_nll_tokens: how many such tokens the whole optimizer step has, over all micro-batches
            and ranks (pass the local count to get a plain per-micro-batch mean).
        num_pairs: how many pairs the whole optimizer step has (likewise).
        orpo_lambda: weight of the odds-ratio term (TRL's `beta`).
    """
    terms = odds_ratio_terms(chosen_logps, rejected_logps)
    nll_loss = _at_least_float32(nll_sum) / num_nll_tokens
    or_loss = orpo_lambda * terms.or_loss.sum() / num_pairs
    return ORPOLoss(
        loss=nll_loss + or_loss,
        nll_loss=nll_loss,
        or_loss=or_loss,
        log_odds_ratio=terms.log_odds_ratio.detach(),
        or_per_pair=terms.or_loss.detach(),
    )


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(target) at every position, in float32 at least: logits [N, T, V], targets [N, T] in
    [0, V) -> [N, T]. Callers replace ignored targets (-100) by a valid id and mask the result.
    """
    logits = _at_least_float32(logits)
    safe = targets.clamp(min=0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class PolicyLogps(NamedTuple):
    """What the loss needs from one forward over a collated micro-batch of B pairs."""

    chosen_logps: torch.Tensor  # [B] mean log-prob of each chosen response
    rejected_logps: torch.Tensor  # [B]
    nll_sum: torch.Tensor  # scalar, summed NLL of the chosen rows' L_SFT targets


def policy_logps(logits: torch.Tensor, labels: torch.Tensor, nll_labels: torch.Tensor) -> PolicyLogps:
    """Response log-probs and the SFT NLL from one log-softmax pass.

    logits [2B, T, V] (chosen rows first); labels [2B, T] and nll_labels [B, T] hold target ids
    at the positions they score and -100 elsewhere (see orpo.collator). Position t's logits
    predict token t+1.
    """
    targets = labels[:, 1:]
    response = targets != -100
    pairs = nll_labels.shape[0]
    nll_targets = nll_labels[:, 1:]
    nll_mask = nll_targets != -100
    # Where both score a chosen position they name the same token (the input's next token), so the
    # union of the two target sets needs one log-softmax, also with nll_on_prompt's prompt tokens.
    scored = response.clone()
    scored[:pairs] |= nll_mask
    union = targets.clone()
    union[:pairs] = torch.where(nll_mask, nll_targets, targets[:pairs])
    logps = token_logps(logits[:, :-1], torch.where(scored, union, 0))
    means = (logps * response).sum(-1) / response.sum(-1).clamp(min=1)
    nll_sum = -(logps[:pairs] * nll_mask).sum()
    return PolicyLogps(means[:pairs], means[pairs:], nll_sum)
