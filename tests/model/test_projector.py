"""The projector: shapes, config round trip, and output at the LLM's token-embedding scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmart.model.projector import ArtworkProjector, ProjectorConfig, build_projector, embedding_rms


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_maps_every_vector_and_keeps_leading_dims(kind: str) -> None:
    projector = ArtworkProjector(ProjectorConfig(in_dim=16, out_dim=64, kind=kind))
    out = projector(torch.randn(5, 3, 16))
    assert out.shape == (5, 3, 64)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projected_vectors_start_at_the_token_embedding_norm(kind: str) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(500, 64)
    with torch.no_grad():
        embedding.weight.mul_(0.13)  # SmolLM2's token-embedding RMS is ~0.136
    projector = build_projector(32, embedding, kind)
    clip_like = torch.randn(50, 32)
    clip_like = clip_like / clip_like.norm(dim=-1, keepdim=True)  # L2-normalised, elements ~0.18
    with torch.no_grad():
        token_norm = float(embedding.weight.norm(dim=-1).mean())
        projected_norm = float(projector(clip_like).norm(dim=-1).mean())
    assert projector.config.output_rms == pytest.approx(embedding_rms(embedding))
    assert projected_norm == pytest.approx(token_norm, rel=0.05)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_each_input_vector_fills_its_own_consecutive_slots(kind: str) -> None:
    torch.manual_seed(0)
    projector = ArtworkProjector(ProjectorConfig(in_dim=16, out_dim=8, kind=kind, tokens=3))
    x = torch.randn(5, 2, 16)
    out = projector(x)
    assert out.shape == (5, 6, 8)  # [n, T * E, H]
    changed = x.clone()
    changed[:, 1] = torch.randn(5, 16)  # the second cached vector of every artwork
    again = projector(changed)
    torch.testing.assert_close(again[:, :3], out[:, :3])  # slots of vector 0 unchanged
    assert (again[:, 3:] - out[:, 3:]).abs().amax(-1).min() > 1e-3  # every slot of vector 1 moved
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # the E outputs of one vector differ


def test_config_round_trips_and_rejects_unknown_kinds() -> None:
    config = ProjectorConfig(in_dim=8, out_dim=4, kind="linear", output_rms=0.5)
    assert ProjectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="projector kind"):
        ProjectorConfig(in_dim=8, out_dim=4, kind="mlp3x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_rms"):
        ProjectorConfig(in_dim=8, out_dim=4, output_rms=0.0)
    with pytest.raises(ValueError, match="tokens"):
        ProjectorConfig(in_dim=8, out_dim=4, tokens=0)
    # A spec saved before ``tokens`` existed loads as one slot per vector.
    assert ProjectorConfig.from_dict({"in_dim": 8, "out_dim": 4, "kind": "linear", "output_rms": 0.5}).tokens == 1
