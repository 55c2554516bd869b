"""Score only the pairs a review shows, with a saved chooser (``mmart review --model DIR``).

``mmart.predict.predict`` scores a whole split (or a seeded sample of it); a review of 8
members needs a few dozen pairs, so this runs the same steps as ``predict`` (same saved
config, same prompts, same ``score_rows`` and ``predictions_frame``) on the chosen pairs only.
Keep it in step with ``predict``; a ``pairs=`` argument there would make this a one-liner.
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
    import yaml

    from mmart.config import PipelineConfig, _from_dict
    from mmart.model.checkpoint import load_chooser
    from mmart.model.chooser import set_artwork_cache
    from mmart.predict import predictions_frame, score_rows
    from mmart.train.common import device, load_inputs
    from mmart.train.data import cache_rows, choice_dataset

    saved = model_dir / "pipeline.yaml"  # the prompt and cache settings the model was trained with
    cfg = _from_dict(PipelineConfig, yaml.safe_load(saved.read_text()), str(saved), None) if saved.is_file() \
        else PipelineConfig()
    inputs = load_inputs(cfg, str(data_dir), check=False)
    model, tokenizer, _ = load_chooser(model_dir, device=device())
    if inputs.cache is not None:
        set_artwork_cache(model, inputs.cache.embeddings)
    examples = [ex for ex in inputs.builder.pair_examples(split) if (ex.user_id, ex.title_id) in pairs]
    rows = choice_dataset(inputs.builder, examples, tokenizer, cache_rows(inputs.cache)).to_list()
    probs = score_rows(model, rows, tokenizer.pad_token_id, batch_size, progress)
    imps = inputs.contract.frame("impressions")
    return predictions_frame(examples, probs, imps[imps.split == split])
