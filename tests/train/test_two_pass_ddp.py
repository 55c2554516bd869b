"""The cached-prefix pass calls the model twice per step; under DDP (2 gloo processes) its gradients
must still be the one-process gradients, also when one rank's batch wants two passes and the other's
does not (each DDP forward syncs buffers: ranks taking different ways would hang)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


def _grads(world: str, ddp: bool, rank: int = 0, both: bool = True) -> torch.Tensor:
    from collections import Counter

    from mmart.data.contract import load_contract
    from mmart.eval.reward_model import fit_reward_model
    from mmart.examples import ExampleBuilder, PromptConfig, PromptEncoder
    from mmart.model.checkpoint import add_lora, lora_config
    from mmart.model.packing import collate_rows
    from mmart.model.scoring import TWO_PASS_MIN_DECISIONS, score_batch
    from mmart.model.testing import tiny_chooser
    from mmart.train.data import decision_rows
    from mmart.train.sft import choice_loss

    torch.set_num_threads(1)
    contract = load_contract(world)
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser("llama", tokens_per_artwork=1, projector_tokens=2, num_artworks=len(arts))
    index = {a: i for i, a in enumerate(arts)}
    builder = ExampleBuilder(contract, PromptConfig(answer="per_candidate", max_history=3, names=False, synopsis=False))
    pool = builder.pair_examples("train", labels=True)
    member = Counter(e.user_id for e in pool).most_common(2)[rank][0]
    logged = [e for e in pool if e.user_id == member]
    # rank 0: one member's row of 12+ blocks (two passes wanted); rank 1: another member's, the same way
    # (both) or its few logged titles only (two passes not wanted: no rank takes them)
    long = rank == 0 or both
    examples = logged + builder.unlogged_examples(logged, TWO_PASS_MIN_DECISIONS, seed=0) if long else logged
    enc = PromptEncoder(builder, tok, slots_per_artwork=2)
    rows = decision_rows(enc, examples, lambda ids: [index[a] for a in ids], 64, fit_reward_model(contract), 0.5,
                         propensity_clip=10.0).to_list()
    batch = collate_rows(rows, tok.pad_token_id)
    assert (int(batch["segment_ids"].max()) >= TWO_PASS_MIN_DECISIONS) == long
    model = add_lora(model, lora_config(r=4, alpha=8, dropout=0.0)).train()
    wrapped = DistributedDataParallel(model) if ddp else model
    choice_loss(score_batch(wrapped, batch), batch, teacher_weight=0.6)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rank(rank: int, world: str, port: int, out: str, both: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))  # a hang fails
    try:
        grads = _grads(world, ddp=True, rank=rank, both=both)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("both", [True, False], ids=["both-ranks-two-pass", "one-rank-wants-two-passes"])
def test_two_pass_under_ddp_equals_one_process(tiny_world, tmp_path, both: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.start_processes(_rank, args=(str(tiny_world), port, str(out), both), nprocs=2, start_method="spawn", join=True)
    ddp = torch.load(out, weights_only=True)
    one = (_grads(str(tiny_world), ddp=False, rank=0, both=both)
           + _grads(str(tiny_world), ddp=False, rank=1, both=both)) / 2  # DDP's mean over the ranks
    assert one.abs().max() > 0
    torch.testing.assert_close(ddp, one, rtol=1e-4, atol=1e-7)
