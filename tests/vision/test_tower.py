"""The tower: open_clip's own model and preprocessing, a fingerprint that can be predicted without loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmart.errors import UserError
from mmart.vision.config import CacheConfig, VisionConfig
from mmart.vision.tower import encode_images, expected_fingerprint, fingerprint_differences, load_tower


def test_fingerprint_predicted_without_loading_matches_the_loaded_tower(tower, vision_cfg):
    assert expected_fingerprint(vision_cfg) == tower.fingerprint
    assert tower.fingerprint["preprocess"]["size"] == [64, 48]  # the registered arch keeps the artworks' 4:3


def test_preprocess_override_reaches_open_clip_and_the_fingerprint():
    cfg = VisionConfig(checkpoint=None, image_interpolation="bilinear", image_resize_mode="squash")
    tw = load_tower(cfg)
    assert tw.fingerprint == expected_fingerprint(cfg)
    assert tw.fingerprint["preprocess"]["interpolation"] == "bilinear"
    assert "Resize" in repr(tw.preprocess) and "CenterCrop" not in repr(tw.preprocess)  # squash: open_clip's transform


def test_real_config_fingerprint_resolves_offline():
    """The ViT-L-14 LAION tag's preprocessing is known without downloading anything."""
    fp = expected_fingerprint(VisionConfig(model="ViT-L-14", pretrained="laion2b_s32b_b82k", checkpoint=None))
    assert fp["preprocess"]["mean"] == [0.5, 0.5, 0.5] and fp["preprocess"]["size"] == [224, 224]


def test_seeded_random_init_is_reproducible(tower, vision_cfg):
    again = load_tower(vision_cfg)
    for (k, a), b in zip(tower.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    other = load_tower(VisionConfig(checkpoint=None, init_seed=1))
    assert not torch.equal(other.model.visual.proj, tower.model.visual.proj)
    assert fingerprint_differences(tower.fingerprint, other.fingerprint) == ["random-init seed: cache has 0, config asks for 1"]


def test_encode_shapes_and_tokens(tower):
    image = Image.new("RGB", (96, 128), (200, 30, 30))
    x = tower.preprocess(image)[None]
    with torch.inference_mode():
        pooled = encode_images(tower.model, x, 1)
        grid = encode_images(tower.model, x, 4)
        plain = tower.model.encode_image(x, normalize=True)
    assert pooled.shape == (1, 1, 128) and grid.shape == (1, 4, 128)
    torch.testing.assert_close(pooled[:, 0], plain)  # T=1 is exactly open_clip's normalised embedding
    torch.testing.assert_close(grid.norm(dim=-1), torch.ones(1, 4))
    with pytest.raises(UserError, match="4x4 grid"):
        encode_images(tower.model, x, 16)  # the 64x48 / 16 px tower has a 4x3 patch grid


def test_clear_errors_for_unknown_model_tag_and_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="unknown open_clip architecture 'ViT-B-23'; did you mean"):
        expected_fingerprint(VisionConfig(model="ViT-B-23", checkpoint=None))
    with pytest.raises(UserError, match="no pretrained tag 'laion9b'"):
        expected_fingerprint(VisionConfig(model="ViT-L-14", pretrained="laion9b", checkpoint=None))
    with pytest.raises(UserError, match="mmart vision adapt"):
        load_tower(VisionConfig(checkpoint=str(tmp_path / "mmart-tiny-vit-adapted.safetensors")))
    with pytest.raises(ValueError, match="either pretrained"):
        VisionConfig(pretrained="openai", checkpoint="x.safetensors")
    with pytest.raises(ValueError, match="tokens_per_artwork must be 1 or a square"):
        CacheConfig(tokens_per_artwork=3)


def test_split_preprocess_gives_the_same_pixels(tower, tiny_world):
    """uint8 in the workers + scaling and Normalize on the device == open_clip's whole transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from mmart.vision.tower import split_preprocess

    images = [Image.open(p).convert("RGB") for p in sorted((tiny_world / "images").glob("*.png"))[:4]]
    for preprocess in (tower.preprocess, image_transform_v2(PreprocessCfg(size=224), is_train=False)):
        to_uint8, finish = split_preprocess(preprocess)
        first = to_uint8(images[0])
        assert first.dtype == torch.uint8
        split = finish(torch.stack([to_uint8(im) for im in images]))
        whole = torch.stack([preprocess(im) for im in images])
        assert torch.equal(split, whole)


def test_a_seeded_random_init_builds_without_open_clips_no_weights_warning(vision_cfg, caplog):
    """mmart asked for the random init (and says so in the fingerprint): open_clip's notice is dropped, only it."""
    import logging

    caplog.set_level(logging.WARNING)
    load_tower(vision_cfg)
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    logging.getLogger().warning("No pretrained weights loaded for model 'x'")  # the filter is gone after the build
    assert any("model 'x'" in r.getMessage() for r in caplog.records)
