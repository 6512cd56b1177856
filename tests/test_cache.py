"""The latent/prompt cache: a cached training step equals the uncached one; invalidation is per item or total."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
from torch.utils.data import default_collate

from cldm.model import create_model
from training.cache import (
    CachedDataset,
    CacheMissError,
    StaleCacheError,
    build_cache,
    cached_batch_encoder,
    model_fingerprint,
)
from training.dataset import ControlDataset
from training.make_fill50k import make_fill50k

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 5


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    model = create_model(REPO / "models" / "cldm_tiny.yaml")
    model.materialize()
    return model.eval()


@pytest.fixture(scope="module")
def pristine_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fill") / "fill50k"
    make_fill50k(root, N_ITEMS, 64, seed=3)
    return root


@pytest.fixture()
def data(pristine_data: Path, tmp_path: Path) -> Path:
    """A private copy: tests that edit images must not affect others."""
    return Path(shutil.copytree(pristine_data, tmp_path / "data"))


def loss_at_seed(model: Any, batch: dict[str, Any], seed: int = 1234) -> torch.Tensor:
    """The training loss of `batch` at `seed`; a cached batch is read as `tutorial_train.py --cache` reads it."""
    torch.manual_seed(seed)
    default = model.batch_encoder
    if "latent_moments" in batch:
        model.batch_encoder = cached_batch_encoder
    try:
        loss, _ = model.shared_step(batch)
    finally:
        model.batch_encoder = default
    return loss


def edit_target(dataset: ControlDataset, index: int) -> None:
    """Change one pixel of item `index`'s target file (what a user re-exporting an image does)."""
    path = str(dataset._records[index].target)
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    image[0, 0] = 255 - image[0, 0]
    cv2.imwrite(path, image)


def test_cached_step_equals_uncached(model: Any, data: Path, tmp_path: Path) -> None:
    dataset = ControlDataset(data)
    report = build_cache(model, dataset, tmp_path / "cache", batch_size=3, shard_size=2)
    assert (report.items, report.encoded, report.reused, report.stale) == (N_ITEMS, N_ITEMS, 0, 0)
    assert report.prompts_encoded == report.prompts == len({dataset.prompt(i) for i in range(N_ITEMS)} | {""})
    assert report.shards_written >= 2
    cached = CachedDataset(dataset, tmp_path / "cache", model_fingerprint(model))
    item = cached[0]
    assert set(item) == {"latent_moments", "context", "hint", "txt"}  # no target image to decode
    assert item["latent_moments"].shape == (8, 8, 8) and item["latent_moments"].dtype == torch.float32
    assert item["context"].shape == (77, 32)
    for indices in ([0, 1], [2, 3, 4]):
        uncached_batch = default_collate([dataset[i] for i in indices])
        cached_batch = default_collate([cached[i] for i in indices])
        assert torch.equal(cached_batch["hint"], uncached_batch["hint"])
        assert cached_batch["txt"] == uncached_batch["txt"]
        expected = loss_at_seed(model, uncached_batch)
        got = loss_at_seed(model, cached_batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The moments are the posterior's, so the cached latent is still a fresh sample at every step.
    assert not torch.equal(loss_at_seed(model, cached_batch, 1), loss_at_seed(model, cached_batch, 2))


def test_changed_image_invalidates_only_its_entry(model: Any, data: Path, tmp_path: Path) -> None:
    dataset = ControlDataset(data)
    cache = tmp_path / "cache"
    build_cache(model, dataset, cache, batch_size=2)
    fingerprint = model_fingerprint(model)
    before = CachedDataset(dataset, cache, fingerprint)
    old = [before[i]["latent_moments"] for i in range(N_ITEMS)]

    edit_target(dataset, 1)
    with pytest.raises(StaleCacheError):
        before[1]  # an open data set notices the edit instead of serving the old latent
    with pytest.raises(CacheMissError, match="1 items"):
        CachedDataset(dataset, cache, fingerprint)

    report = build_cache(model, dataset, cache, batch_size=2)
    assert (report.encoded, report.reused, report.stale, report.prompts_encoded) == (1, N_ITEMS - 1, 1, 0)
    after = CachedDataset(dataset, cache, fingerprint)
    for i in range(N_ITEMS):
        assert torch.equal(after[i]["latent_moments"], old[i]) == (i != 1)
    again = build_cache(model, dataset, cache)
    assert (again.encoded, again.reused, again.shards_written) == (0, N_ITEMS, 0)


def test_changed_model_invalidates_all(model: Any, data: Path, tmp_path: Path) -> None:
    dataset = ControlDataset(data)
    cache = tmp_path / "cache"
    first = build_cache(model, dataset, cache)
    weights = {
        "vae": model.first_stage_model.encoder.conv_in.weight,
        "text": model.cond_stage_model.transformer.text_model.final_layer_norm.weight,
    }
    unet_weight = model.model.diffusion_model.input_blocks[0][0].weight
    saved = {name: w.detach().clone() for name, w in [*weights.items(), ("unet", unet_weight)]}
    try:
        with torch.no_grad():
            unet_weight.add_(1.0)  # training the UNet/ControlNet does not touch what is cached
        assert model_fingerprint(model) == first.fingerprint
        for part, weight in weights.items():
            with torch.no_grad():
                weight.add_(1e-3)
            report = build_cache(model, dataset, cache)
            assert report.fingerprint != first.fingerprint, part
            assert (report.encoded, report.reused) == (N_ITEMS, 0), part
            assert report.prompts_encoded == report.prompts, part
            assert report.stale >= N_ITEMS, part  # the old entries stay on disk but are never read
            with torch.no_grad():
                weight.copy_(saved[part])
    finally:
        with torch.no_grad():
            for name, weight in [*weights.items(), ("unet", unet_weight)]:
                weight.copy_(saved[name])
    assert model_fingerprint(model) == first.fingerprint
    assert build_cache(model, dataset, cache).encoded == 0  # the original entries are still valid


def test_empty_prompt_is_cached_for_dropout(model: Any, data: Path, tmp_path: Path) -> None:
    dataset = ControlDataset(data, drop_prompt=0.5, seed=1)
    dropped = [i for i in range(N_ITEMS) if dataset.prompt(i) == ""]
    assert dropped and len(dropped) < N_ITEMS
    build_cache(model, dataset, tmp_path / "cache")
    cached = CachedDataset(dataset, tmp_path / "cache", model_fingerprint(model))
    with torch.no_grad():
        empty = model.get_learned_conditioning([""])[0]
    torch.testing.assert_close(cached.empty_context(), empty)
    for i in dropped:
        assert cached[i]["txt"] == ""
        assert torch.equal(cached[i]["context"], cached.empty_context())


def test_resize_is_part_of_the_key(model: Any, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(model, ControlDataset(data), cache)
    report = build_cache(model, ControlDataset(data, size=32), cache)
    assert (report.encoded, report.reused) == (N_ITEMS, 0)
    item = CachedDataset(ControlDataset(data, size=32), cache, report.fingerprint)[0]
    assert item["latent_moments"].shape == (8, 4, 4)
