"""Frozen SD weights held in bf16 (`hold_frozen_weights_in`): half the memory, same numbers under autocast,
full-precision checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import build_tiny, rel_err
from test_options import tiny_batch, training_step

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model(tiny_state: dict[str, torch.Tensor]) -> Any:
    model = build_tiny()
    model.load_state_dict(tiny_state)
    return model.train()


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def test_frozen_parts_halve_and_checkpoint_keeps_exact_weights(model: Any, tiny_state: dict[str, torch.Tensor]
                                                               ) -> None:
    model.hold_frozen_weights_in(torch.bfloat16)
    for frozen in (model.model.diffusion_model, model.first_stage_model, model.cond_stage_model):
        assert dtypes(frozen) == {torch.bfloat16}
    assert dtypes(model.control_model) == {torch.float32}
    saved = model.state_dict()
    assert saved.keys() == tiny_state.keys()
    changed = [k for k in saved if saved[k].dtype != tiny_state[k].dtype or not torch.equal(saved[k], tiny_state[k])]
    assert changed == []
    model.hold_frozen_weights_in(None)  # back to full precision, bit for bit
    assert dtypes(model) == {torch.float32}
    assert all(torch.equal(v, tiny_state[k]) for k, v in torch.nn.Module.state_dict(model).items())


def test_training_step_matches_autocast_with_full_precision_weights(model: Any) -> None:
    """Autocast casts every frozen matmul/conv weight to bf16 anyway: holding them in bf16 changes little."""
    batch = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_full, grads_full = training_step(model, batch)
    model.hold_frozen_weights_in(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_half, grads_half = training_step(model, batch)
    assert loss_half.dtype == torch.float32
    assert abs(loss_half.item() - loss_full.item()) <= 0.02 * loss_full.item()
    assert rel_err(torch.cat([g.flatten() for g in grads_half.values()]),
                   torch.cat([g.flatten() for g in grads_full.values()])) < 0.05
    assert all(g.dtype == torch.float32 for g in grads_half.values())


def test_unlocked_decoder_trains_at_full_precision(model: Any, tiny_state: dict[str, torch.Tensor]) -> None:
    model.hold_frozen_weights_in(torch.bfloat16)
    unet = model.model.diffusion_model
    model.sd_locked = False
    assert dtypes(unet.output_blocks) == dtypes(unet.out) == {torch.float32}
    assert dtypes(unet.input_blocks) == {torch.bfloat16}
    restored = {k: v for k, v in torch.nn.Module.state_dict(model).items() if ".output_blocks." in k}
    assert restored and all(torch.equal(v, tiny_state[k]) for k, v in restored.items())
    model.sd_locked = True
    assert dtypes(unet.output_blocks) == {torch.bfloat16}


def test_sampling_and_logging_run_outside_autocast(model: Any) -> None:
    """The image logger and the sampler run outside Lightning's autocast: the model brings its own."""
    model.hold_frozen_weights_in(torch.bfloat16)
    torch.manual_seed(0)
    log = model.log_images(tiny_batch(), N=2, ddim_steps=2)
    assert {v.dtype for v in log.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in log.values())


def test_loading_weights_updates_what_checkpoints_save(model: Any, tiny_state: dict[str, torch.Tensor]) -> None:
    model.hold_frozen_weights_in(torch.bfloat16)
    other = {k: v + 0.001 if v.is_floating_point() else v for k, v in tiny_state.items()}
    model.load_state_dict(other)
    saved = model.state_dict()
    assert all(torch.equal(saved[k], other[k]) for k in other)
    assert dtypes(model.model.diffusion_model) == {torch.bfloat16}
