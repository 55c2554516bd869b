"""Projector: cached artwork vectors -> vectors in the LLM's input-embedding space.

Shape letters: N artworks in the cache, T vectors per artwork (``tokens_per_artwork``),
D the vision-embedding width (e.g. 512 for CLIP ViT-B-32), H the LLM hidden size,
E the slots each cached vector fills (``tokens``).

Why E > 1: a small LLM reads an artwork far better as a few word-like tokens than as one
vector. Stage 0 (``mmart.train.align``) fits each of the E outputs to the embedding of one
describing word (theme, shot, tone, title size), so the slots read like the caption words
the LLM already understands, and SFT starts from there.

Why the norms around the MLP: CLIP-style cache vectors are L2-normalised, so each
element is ~1/sqrt(D); a freshly initialised MLP on them gives outputs of norm ~0.12
while SmolLM2's token embeddings have norm ~3.2 (docs/architecture.md). Vectors 25x too small
are close to invisible to the first attention layers, and the model would need many
steps just to learn the scale. So the input goes through a LayerNorm (unit-variance
features whatever the tower) and the output through an RMSNorm whose per-channel gain
is initialised to the token embeddings' RMS: the projected vectors start at exactly
the scale of real tokens and the gain stays learnable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

ProjectorKind = Literal["linear", "mlp2x_gelu"]
PROJECTOR_KINDS: tuple[str, ...] = ("linear", "mlp2x_gelu")


@dataclass(frozen=True)
class ProjectorConfig:
    """Architecture of the projector; saved beside the adapter as JSON.

    Attributes:
        in_dim: D, width of the cached artwork vectors.
        out_dim: H, hidden size of the LLM.
        kind: ``linear`` (one Linear) or ``mlp2x_gelu`` (Linear, GELU, Linear: LLaVA-1.5's).
        output_rms: initial per-channel gain of the output RMSNorm; set it to the RMS of
            the LLM's token embeddings (``embedding_rms``) so slots start at token scale.
        tokens: E, output vectors (prompt slots) per input vector.
    """

    in_dim: int
    out_dim: int
    kind: ProjectorKind = "mlp2x_gelu"
    output_rms: float = 1.0
    tokens: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector kind {self.kind!r} is not one of {PROJECTOR_KINDS}")
        if self.in_dim <= 0 or self.out_dim <= 0:
            raise ValueError(f"projector dims must be positive, got in_dim={self.in_dim}, out_dim={self.out_dim}")
        if self.tokens < 1:
            raise ValueError(f"projector tokens (slots per artwork vector) must be >= 1, got {self.tokens}")
        if not self.output_rms > 0:
            raise ValueError(f"projector output_rms must be positive, got {self.output_rms}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectorConfig:
        return cls(**data)


class ArtworkProjector(nn.Module):
    """Maps artwork vectors ``[..., T, D]`` to ``[..., T * E, H]``: E output vectors per input vector.

    Leading dimensions are kept, so an artwork cached as T vectors fills T * E slots, each
    input vector's E outputs consecutive. The E outputs share the first layer and differ in
    the last (one ``E * H`` wide Linear).
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.in_dim)
        width = config.out_dim * config.tokens
        if config.kind == "linear":
            self.mlp: nn.Module = nn.Linear(config.in_dim, width)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(config.in_dim, config.out_dim),
                nn.GELU(),
                nn.Linear(config.out_dim, width),
            )
        self.output_norm = nn.RMSNorm(config.out_dim, eps=1e-6)
        with torch.no_grad():
            self.output_norm.weight.fill_(config.output_rms)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors``: ``[..., T, D]`` -> ``[..., T * E, H]`` in the projector's parameter dtype."""
        if vectors.ndim < 2:
            raise ValueError(f"projector input must be [..., T, D], got shape {tuple(vectors.shape)}")
        out = self.mlp(self.input_norm(vectors))  # [..., T, E * H]
        out = out.reshape(*vectors.shape[:-2], vectors.shape[-2] * self.config.tokens, self.config.out_dim)
        return self.output_norm(out)


def embedding_rms(embedding: nn.Module) -> float:
    """Root-mean-square of the entries of an embedding matrix ``[V, H]``.

    An embedding row then has norm ``rms * sqrt(H)`` on average (SmolLM2: 0.136 * 24 ~ 3.2).
    """
    weight = embedding.weight.detach().float()
    return float(weight.pow(2).mean().sqrt())


def build_projector(
    in_dim: int, llm_embeddings: nn.Module, kind: ProjectorKind = "mlp2x_gelu", tokens: int = 1
) -> ArtworkProjector:
    """A projector sized and scaled for an LLM: ``H`` and the output gain come from its embeddings.

    Created in fp32 (a few M parameters at most): it is fully trained, and fp32 master
    weights keep small updates from rounding away; the chooser casts its output to the
    LLM's dtype.
    """
    weight = llm_embeddings.weight
    config = ProjectorConfig(
        in_dim=in_dim, out_dim=int(weight.shape[1]), kind=kind, output_rms=embedding_rms(llm_embeddings), tokens=tokens
    )
    return ArtworkProjector(config).to(device=weight.device)
