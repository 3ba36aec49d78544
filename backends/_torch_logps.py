"""Per-token log-probs and full-vocabulary KL through a gathered LM head, in PyTorch.

Shapes: N = 2B sequences (chosen then rejected) of length T, hidden size H, vocabulary V,
K completion tokens in the whole batch, U <= K of them distinct (``tabpo.data.layout``: the
shared-prefix layout computes a token both sides share once).

Only the U hidden states that predict a completion token go through the LM head, in the
core's ``head_chunks``, each under activation checkpointing when a gradient is needed: the
(chunk, V) float32 logits are rebuilt in the backward pass instead of being kept, so the
peak is one chunk of logits, never (N, T, V). The core's ``place`` puts the values back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tabpo.common.errors import TabpoError
from tabpo.data.batching import PairBatch, split_rows
from tabpo.data.layout import fork_mask, head_chunks, layout, place
from tabpo.training.backend import RefLogps
from tabpo.training.reference import check_given


class DeviceBatch:
    """One batch on the device: the decoder inputs of its layout (plain (2B, T) or forked,
    ``tabpo.data.layout``) and the completion targets."""

    def __init__(
        self,
        batch: PairBatch,
        device: torch.device,
        sharing: str = "auto",
        mask_kind: str | None = "bool",
    ) -> None:
        lay = layout(batch, sharing)
        self.device = device
        self.mask_kind = mask_kind
        self.layout = lay
        self.shape = lay.shape
        self.pairs = batch.size
        self.ids = torch.from_numpy(lay.ids).to(device)
        self.attention = torch.from_numpy(lay.attention).to(device=device, dtype=torch.long)
        self.hidden = torch.from_numpy(lay.targets.hidden_index).to(device)
        self.target = torch.from_numpy(lay.targets.target_ids).to(device)
        self.placement = torch.from_numpy(lay.placement).to(device)
        self.batch = batch

    def decoder_inputs(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Keyword arguments of the decoder: the 2-D padding mask of the plain layout, or
        the forked layout's position ids and (R, 1, L, L) mask: boolean (sdpa) or additive
        in ``dtype`` (eager)."""
        lay = self.layout
        if lay.segments is None or lay.positions is None:
            return {"input_ids": self.ids, "attention_mask": self.attention}
        if self.mask_kind is None:
            raise TabpoError("this model's attention takes no fork mask: prefix sharing is off")
        segments = torch.from_numpy(lay.segments).to(self.device)
        order = torch.arange(segments.shape[1], device=self.device)
        mask = fork_mask(segments, order)[:, None]  # (R, 1, L, L), True = attend
        if self.mask_kind == "additive":
            allowed = mask
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        positions = torch.from_numpy(lay.positions).to(self.device)
        return {"input_ids": self.ids, "attention_mask": mask, "position_ids": positions}

    def sides(self, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """(U,) per-target values as chosen (B, T) and rejected (B, T) (None in a
        completion-only batch), 0 elsewhere."""
        return split_rows(place(values, self.placement, self.shape), self.pairs)

    def tensor(self, array: np.ndarray | None) -> Tensor | None:
        if array is None:
            return None
        return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=self.device)

    def given(self, ref: RefLogps) -> tuple[Tensor, Tensor]:
        """Precomputed reference log-probs, checked against this batch's (B, T)."""
        check_given(self.batch, ref)
        return self.tensor(ref[0]), self.tensor(ref[1])


def completion_hidden(causal_lm: nn.Module, inputs: DeviceBatch) -> Tensor:
    """Final hidden states (U, H) at the rows of the flattened (R*L, H) states that predict
    a completion token; the LM head is left out so it runs on these rows only."""
    decoder = causal_lm.get_decoder()
    out = decoder(**inputs.decoder_inputs(causal_lm.dtype), use_cache=False)
    hidden = out.last_hidden_state.flatten(0, 1)  # (R*L, H)
    return hidden.index_select(0, inputs.hidden)  # (U, H)


def token_logps(rows: Tensor, head: nn.Module, target_ids: Tensor) -> Tensor:
    """``log pi(y_t) = z[y_t] - logsumexp(z)`` with z = head(h) in float32 (float64 in a
    float64 model), shape (U,)."""

    def chunk(h: Tensor, target: Tensor) -> Tensor:
        logits = widened(head(h))  # (k, V)
        return logits.gather(-1, target[:, None]).squeeze(-1) - logits.logsumexp(-1)

    return _by_chunks(chunk, _vocab(head), rows, target_ids)


def token_logps_and_kl(
    rows: Tensor, ref_rows: Tensor, head: nn.Module, ref_head: nn.Module, target_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Policy and reference log-probs of the targets and the per-position KL, each (U,).

        KL_t = sum_v pi_ref(v|s_t) (log pi_ref(v|s_t) - log pi_theta(v|s_t))

    The reference side carries no gradient; the KL's gradient flows through pi_theta only.
    """

    def chunk(h: Tensor, h_ref: Tensor, target: Tensor) -> Tensor:
        logp = widened(head(h)).log_softmax(-1)  # (k, V)
        with torch.no_grad():
            ref_logp = widened(ref_head(h_ref)).log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        pick = target[:, None]
        return torch.stack([logp.gather(-1, pick)[:, 0], ref_logp.gather(-1, pick)[:, 0], kl])

    out = _by_chunks(chunk, _vocab(head), rows, ref_rows.detach(), target_ids)  # (3, U)
    return out[0], out[1], out[2]


def _by_chunks(fn: Callable[..., Tensor], vocab: int, *rows: Tensor) -> Tensor:
    """``fn`` over the core's ``head_chunks`` of ``rows``, concatenated along the last axis;
    checkpointed when a gradient is being recorded, so no chunk's logits outlive its own
    computation."""
    grad = torch.is_grad_enabled()
    parts = []
    for part in head_chunks(rows[0].shape[0], vocab):
        chunk = [r[part] for r in rows]
        if grad:  # the RNG is replayed in case the head has LoRA dropout (target lm_head)
            parts.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            parts.append(fn(*chunk))
    if not parts:  # no completion token at all: keep the graph valid with an empty result
        return fn(*[r[:0] for r in rows])
    return torch.cat(parts, dim=-1)


def widened(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is float64 (parity's reference computation)."""
    return x if x.dtype == torch.float64 else x.float()


def _vocab(head: nn.Module) -> int:
    return int(head.weight.shape[0])
