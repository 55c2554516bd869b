"""A decision as text for an LLM teacher: the prompt's history, title and candidates, captions standing for images.

The student reads artwork slots; a text-only teacher reads each artwork as its caption and tags
instead (what the slots were aligned to). The fields fill ``rationale.template``.
"""

from __future__ import annotations

from mmart.examples import Example, ExampleBuilder
from mmart.model.readout import LETTERS, Art, Text


def artwork_text(builder: ExampleBuilder, artwork_id: str) -> str:
    tags = ", ".join(builder.tags.get(artwork_id, []))
    return builder.caption_text(artwork_id) + (f" [{tags}]" if tags else "")


def decision_fields(builder: ExampleBuilder, ex: Example, target: int) -> dict[str, str]:
    """``{history} {title} {candidates} {target} {target_caption}`` of one decision (``TEMPLATE_FIELDS``)."""
    lines = []
    for pieces in builder.history_lines(ex):
        lines.append("".join(p.text if isinstance(p, Text) else artwork_text(builder, p.artwork_id)
                             for p in pieces if isinstance(p, (Text, Art))))
    for extra in (builder.history_summary(ex) if builder.cfg.history_summary else None,
                  builder.genre_summary(ex) if builder.cfg.history_genres else None):
        if extra:
            lines.append(extra)
    return {
        "history": "\n".join(lines) or "- (none)",
        "title": builder.title_line(ex),
        "candidates": "\n".join(f"{LETTERS[k]}: {artwork_text(builder, a)}" for k, a in enumerate(ex.candidates)),
        "target": LETTERS[target],
        "target_caption": artwork_text(builder, ex.candidates[target]),
    }
