"""Score only the pairs a review shows, with a saved chooser (``mmart review --model DIR``).

A review of 8 members needs a few dozen pairs, not the whole split: ``predict(pairs=...)``
scores only those, with the model's saved prompt and cache settings.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def check_model_dir(model_dir: Path) -> None:
    """Fail fast (before loading torch) when ``model_dir`` is not a saved chooser."""
    from mmart.errors import UserError

    if not (model_dir / "mmart_chooser.json").is_file():
        raise UserError(f"--model {model_dir}: not a saved chooser folder (no mmart_chooser.json); pass e.g. "
                        "outputs/default/dpo/model, or --preds FILE from `mmart predict`")


def score_pairs(model_dir: str | Path, data_dir: str | Path, split: str, pairs: set[tuple[str, str]],
                batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """``mmart predict`` output (one row per impression) for the (user_id, title_id) ``pairs`` of ``split``."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    from mmart.predict import predict

    return predict(model_dir, data_dir, split, None, batch_size=batch_size, progress=progress, pairs=pairs)
