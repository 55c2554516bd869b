"""The demo world: a generated catalog, members and logs with a known ground truth."""

from mmart.data.world.config import ALL_THEMES, WorldConfig

__all__ = ["ALL_THEMES", "WorldConfig", "generate_world"]


def generate_world(cfg: WorldConfig, out_dir, progress: bool = True) -> dict:
    """Write a contract-valid dataset folder plus oracle.parquet, world_summary.json, contact_sheet.png."""
    from mmart.data.world.generate import generate_world as _generate

    return _generate(cfg, out_dir, progress=progress)
