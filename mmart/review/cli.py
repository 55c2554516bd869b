"""``mmart review``: image grids of what the model saw and chose, for a sample of members, plus index.html."""

from __future__ import annotations

import argparse

from mmart.config_checks import at_least, cli_number, seeds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review", help="image grids of the model's choices for a sample of members, and one HTML page",
        description=(
            "Draw, for a seeded sample of members of a split, what the model saw and what it chose: a PNG grid per "
            "member (their recent history with the artworks they played from, then one row per title with every "
            "candidate labelled with the model's probability; the model's choice, the played artwork and, on the "
            "demo world, the oracle's choice framed in distinct colours and labelled) and a self-contained "
            "index.html linking them. When the predictions carry the model's own rationale (a model trained with "
            "sft.reasoning), it is shown under each title, as the model's words. Scores come from --preds (a `mmart predict` output) or, without it, from "
            "scoring the sampled members' pairs with --model. Example: mmart review --preds "
            "outputs/default/preds/dpo.parquet --data data/world --out outputs/default/review --members 8"
        ))
    p.add_argument("--model", help="saved chooser folder (e.g. outputs/default/dpo/model); scored here unless --preds")
    p.add_argument("--preds", help="`mmart predict` Parquet for the same dataset and split (no model is loaded)")
    p.add_argument("--data", required=True, help="dataset folder (the demo world's oracle.parquet adds true values)")
    p.add_argument("--out", required=True, help="folder to write index.html and grids/ into (PNGs already in its grids/ are replaced)")
    p.add_argument("--members", type=cli_number(int, at_least, 0), default=8, help="how many members to sample (0 = all matching; default 8)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--seed", type=cli_number(int, seeds), default=0, help="sampling seed (members, and titles past --titles-per-member)")
    p.add_argument("--only", choices=["wins", "losses"],
                   help="only titles where the model's choice beats (loses to) production's by true play probability "
                        "(needs oracle.parquet: demo world)")
    p.add_argument("--title", metavar="ID", help="only this title_id")
    p.add_argument("--genre", metavar="G", help="only titles of this genre")
    p.add_argument("--member", metavar="ID", help="only this user_id")
    p.add_argument("--titles-per-member", type=cli_number(int, at_least, 0), default=6, help="rows per grid at most (0 = all; default 6)")
    p.add_argument("--history", type=cli_number(int, at_least, 0), default=8, help="recent history titles in the strip (default 8)")
    p.add_argument("--batch-size", type=cli_number(int, at_least, 1), default=16, help="scoring batch size with --model")
    p.set_defaults(func=_review)


def _review(args: argparse.Namespace) -> int:
    from mmart.review import Filters, run_review

    result = run_review(args.data, args.out, preds=args.preds, model_dir=args.model, split=args.split,
                        members=args.members, seed=args.seed,
                        filters=Filters(only=args.only, title=args.title, genre=args.genre, member=args.member),
                        titles_per_member=args.titles_per_member, history_items=args.history,
                        batch_size=args.batch_size)
    print(result.index)
    return 0
