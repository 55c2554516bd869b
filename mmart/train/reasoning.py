"""SFT with reasoning as an auxiliary task (``sft.reasoning: auxiliary``; Hsieh et al. 2023, step-by-step).

Each trained decision with a rationale (``mmart rationales``) gets a rationale block in its packed
row (``mmart.model.packing``): the title block as the decision renders it, a cue, the rationale.
One forward over the row gives both the candidates' scores (read in the title blocks, which never
see a rationale block) and the next-token logits of the rationale's tokens; the loss adds
``reasoning_weight`` times the rationale's cross-entropy to the choice loss. Scoring elsewhere
(predict, eval, serve) builds no rationale block, so choosing costs what it did.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mmart.errors import UserError
from mmart.model.forward import token_log_probs
from mmart.model.packing import IGNORE, attention_inputs


def load_rationales(cfg) -> dict[str, str]:
    """example_id -> rationale of ``cfg``'s rationales table; a one-line refusal when it is missing or stale
    (made for other decisions or by another teacher than ``cfg`` asks for)."""
    import pandas as pd

    from mmart.artefacts import stale
    from mmart.rationale.record import rationale_made_from, rationale_table

    table = rationale_table(cfg)
    why = stale(table, rationale_made_from(cfg, cfg.rationale.teacher))
    if why:
        raise UserError(f"sft.reasoning={cfg.sft.reasoning} trains on the rationales table {table}, which is "
                        f"{'missing' if why == ['missing'] else 'stale (' + '; '.join(why) + ')'}: "
                        f"run `mmart rationales --config ...` with this config first")
    frame = pd.read_parquet(table, columns=["example_id", "rationale"])
    return {str(e): str(r) for e, r in zip(frame.example_id, frame.rationale) if isinstance(r, str) and r.strip()}


def scores_and_rationale_ce(model: nn.Module, batch: dict[str, torch.Tensor], readout=None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over packed rows with rationale blocks: candidate scores ``[B, D, K]`` (as ``score_batch``),
    each decision's mean next-token cross-entropy over its rationale's tokens ``[B, D]`` (fp32), and which
    decisions have a rationale ``[B, D]`` (bool; their cross-entropy is 0 elsewhere).

    The LM head runs only at the read positions and at the tokens before each rationale token, not over
    the whole row (a row's ``[L, V]`` logits would be the largest tensor of the step).
    """
    ids, labels, owner = batch["input_ids"], batch["rationale_labels"], batch["rationale_owner"]
    b, d, k = batch["answer_ids"].shape
    reads = batch["score_positions"].reshape(b, d * k)
    kwargs = {"artwork_ids": batch["artwork_ids"]} if batch.get("artwork_ids") is not None else {}
    out = model(input_ids=ids, attention_mask=attention_inputs(model, batch), position_ids=batch["position_ids"],
                logits_to_keep=1, use_cache=False, output_hidden_states=True, **kwargs)
    hidden = out.hidden_states[-1]  # [B, L, H], after the final norm
    rows = torch.arange(b, device=ids.device).unsqueeze(-1)
    head = _lm_head(model)
    read = token_log_probs(head(hidden[rows, reads]), batch["answer_ids"].reshape(b, d * k)).reshape(b, d, k)
    scores = readout.candidate_scores(read) if readout is not None else read
    target = labels[:, 1:]  # token t is predicted at t - 1, in its own block (the cue precedes every rationale)
    trained = target != IGNORE
    ce = F.cross_entropy(head(hidden[:, :-1][trained]).float(), target[trained], reduction="none")  # [N]
    where = torch.arange(b, device=ids.device).unsqueeze(-1).expand_as(target)[trained] * d + owner[:, 1:][trained]
    total = torch.zeros(b * d, device=ids.device, dtype=ce.dtype).index_add(0, where, ce)
    count = torch.zeros(b * d, device=ids.device, dtype=ce.dtype).index_add(0, where, torch.ones_like(ce))
    has = count > 0
    return scores, (total / count.clamp(min=1)).reshape(b, d), has.reshape(b, d)


def _lm_head(model: nn.Module) -> nn.Module:
    from mmart.model.chooser import causal_lm_of

    return causal_lm_of(model).get_output_embeddings()


def rationale_loss(ce: torch.Tensor, has: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The mean over the decisions with a rationale of their cross-entropy (0, still in the graph, without any),
    and its value for the metrics."""
    loss = ce[has].mean() if bool(has.any()) else ce.sum() * 0.0
    return loss, float(loss.detach())
