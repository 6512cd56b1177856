"""SDXL as a third family on the one path: the real checkpoint's layout, sgm's numbers, control with 10 residuals.

References (../shared/reference/sdxl/, made with sgm itself): the names and shapes of sd_xl_base_1.0 and of an SDXL
ControlNet in the web UI's layout; a tiny sgm UNet with its outputs; tiny sgm text embedders and conditioner outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, reference_file, rel_err, run_script, trained_like
from safetensors.torch import load_file

from cldm.checkpoint import CheckpointMismatchError, family_of
from cldm.control import Control, UNetWithControls, guess_mode_scales
from cldm.model import create_model, load_state_dict
from ldm.errors import InputError
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.modules.encoders.conditioner import SIZE_KEYS, ConcatTimestepEmbedderND, default_sizes

pytestmark = pytest.mark.usefixtures("single_thread")

XL, XL_TINY = ROOT / "models" / "cldm_xl.yaml", ROOT / "models" / "cldm_xl_tiny.yaml"
TOLERANCE = 1e-5
#: sd_xl_base_1.0's scheduler/scheduler_config.json, as diffusers publishes it.
SDXL_SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
                         "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
                         "trained_betas": None, "use_karras_sigmas": False}


def _sizes(time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"original_size_as_tuple": time_ids[:, 0:2], "crop_coords_top_left": time_ids[:, 2:4],
            "target_size_as_tuple": time_ids[:, 4:6]}


@pytest.fixture(scope="module")
def unet_ref() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return (json.loads(reference_file("sdxl/tiny_sdxl_unet.json").read_text()),
            load_file(reference_file("sdxl/tiny_sdxl_unet.safetensors")))


@pytest.fixture(scope="module")
def text_ref() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return (json.loads(reference_file("sdxl/tiny_sdxl_text.json").read_text()),
            load_file(reference_file("sdxl/tiny_sdxl_text.safetensors")))


@pytest.fixture(scope="module")
def sgm_model(unet_ref: Any, text_ref: Any) -> Any:
    """The tiny SDXL ControlLDM holding the references' UNet and text encoders (its VAE and ControlNet random)."""
    torch.manual_seed(0)
    model = create_model(XL_TINY)
    model.materialize()
    state = dict(torch.nn.Module.state_dict(model))
    for tensors in (unet_ref[1], text_ref[1]):
        state.update({k: v for k, v in tensors.items() if k.startswith(("model.", "conditioner."))})
    model.load_state_dict(state)
    return model.eval()


def test_full_size_config_has_the_real_checkpoints_names_and_shapes() -> None:
    """models/cldm_xl.yaml builds exactly sd_xl_base_1.0's 2514 tensors plus the web UI layout's ControlNet, in
    seconds (deferred: nothing is initialised)."""
    base = json.loads(reference_file("sdxl/checkpoint_layout_sdxl_base.json").read_text())
    control = json.loads(reference_file("sdxl/checkpoint_layout_sdxl_controlnet.json").read_text())
    model = create_model(XL)
    shapes = {k: list(v.shape) for k, v in torch.nn.Module.state_dict(model).items()}
    expected = {**base["tensors"], **control["tensors"]}
    assert len(base["tensors"]) == 2514
    assert sorted(set(expected) - set(shapes)) == []
    assert sorted(set(shapes) - set(expected)) == []
    assert {k: shapes[k] for k in expected if shapes[k] != expected[k]} == {}
    assert model.control_model.num_residuals == 10
    assert family_of(2048).name == "SDXL"
    assert model.image_size * model.latent_factor == 1024  # what generation defaults to (SD1.5's config: 512)


def test_real_files_extra_buffers_are_tolerated(sgm_model: Any) -> None:
    """sgm saves `denoiser.sigmas`, older transformers `position_ids`: both load strictly and change nothing."""
    state = dict(torch.nn.Module.state_dict(sgm_model))
    extra = {"denoiser.sigmas": torch.rand(1000),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    sgm_model.load_state_dict({**state, **extra})
    assert all(torch.equal(v, torch.nn.Module.state_dict(sgm_model)[k]) for k, v in state.items())


def test_tiny_unet_reproduces_sgm(unet_ref: Any) -> None:
    """sgm's own `params` block builds our UNet; it loads the reference strictly and gives sgm's eps."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params, tensors = unet_ref
    unet = UNetModel(**params["params"])
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        for case in ("io", "e2e"):
            eps = unet(tensors["io.x"], tensors["io.t"], context=tensors[f"{case}.context"], y=tensors[f"{case}.y"])
            assert rel_err(eps, tensors[f"{case}.eps"]) < TOLERANCE, case


def test_vector_y_from_pooled_and_time_ids(unet_ref: Any) -> None:
    """y = [pooled, E(orig h), E(orig w), E(crop top), E(crop left), E(target h), E(target w)], E = cos then sin."""
    _, tensors = unet_ref
    time_ids = tensors["io.time_ids"]
    parts = [tensors["io.pooled"]] + [ConcatTimestepEmbedderND(8)(v) for v in _sizes(time_ids).values()]
    assert rel_err(torch.cat(parts, 1), tensors["io.y"]) < 1e-6
    v, i = 1024.0, torch.arange(4.0)  # the formula itself for one number: f_i = exp(-ln(10000) i / 4)
    expected = torch.cat([torch.cos(v * torch.exp(-torch.log(torch.tensor(1e4)) * i / 4)),
                          torch.sin(v * torch.exp(-torch.log(torch.tensor(1e4)) * i / 4))])
    torch.testing.assert_close(ConcatTimestepEmbedderND(8)(torch.tensor([[v]]))[0], expected)


def test_text_encoders_and_conditioner_reproduce_sgm(sgm_model: Any, text_ref: Any) -> None:
    about, tensors = text_ref
    clip_l, bigg = sgm_model.conditioner.embedders[0], sgm_model.conditioner.embedders[1]
    prompts = about["prompts"]
    assert torch.equal(clip_l.tokenize(prompts), tensors["tokens.clip_l"])  # pads with 49407
    assert torch.equal(bigg.tokenize(prompts), tensors["tokens.openclip"])  # pads with 0
    with torch.no_grad():
        assert rel_err(clip_l.encode_tokens(tensors["tokens.clip_l"]), tensors["out.clip_l.hidden"]) < TOLERANCE
        context, pooled = bigg.encode_tokens(tensors["tokens.openclip"])
        assert rel_err(context, tensors["out.openclip.penultimate"]) < TOLERANCE
        assert rel_err(pooled, tensors["out.openclip.pooled"]) < TOLERANCE
        out = sgm_model.get_learned_conditioning(prompts, _sizes(tensors["io.time_ids"]))
    assert rel_err(out["crossattn"], tensors["out.crossattn"]) < TOLERANCE
    assert rel_err(out["vector"], tensors["out.vector"]) < TOLERANCE


def test_prompts_to_eps_through_the_one_path(sgm_model: Any, unet_ref: Any, text_ref: Any) -> None:
    """Prompts and sizes -> conditioner -> `apply_model` (the original's condition dict, `y` for the vector) gives
    sgm's end-to-end eps; with a fresh (zero-initialised) ControlNet and a hint too, since it adds nothing."""
    _, unet_tensors = unet_ref
    about, text_tensors = text_ref
    x, t = unet_tensors["io.x"], unet_tensors["io.t"]
    with torch.no_grad():
        cond = sgm_model.get_learned_conditioning(about["prompts"], _sizes(text_tensors["io.time_ids"]))
        plain = sgm_model.apply_model(x, t, {"c_crossattn": [cond["crossattn"]], "y": [cond["vector"]],
                                             "c_concat": None})
        fresh_model = create_model(XL_TINY)
        fresh_model.materialize()
        fresh = fresh_model.control_model
        sgm_model_control, sgm_model.control_model = sgm_model.control_model, fresh
        try:
            hint = torch.rand(2, 3, 128, 128)
            controlled = sgm_model.apply_model(x, t, {"c_crossattn": [cond["crossattn"]], "y": [cond["vector"]],
                                                      "c_concat": [hint]})
        finally:
            sgm_model.control_model = sgm_model_control
    assert rel_err(plain, unet_tensors["e2e.eps"]) < TOLERANCE
    assert rel_err(controlled, unet_tensors["e2e.eps"]) < TOLERANCE
    with torch.no_grad():  # the original's form: get_learned_conditioning's output in c_crossattn as it is
        whole = sgm_model.apply_model(x, t, {"c_crossattn": [cond], "c_concat": None})
    assert torch.equal(whole, plain)


def _random_control(model: Any, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.control_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.control_model


def test_ten_residuals_guess_mode_and_conditional_rows(sgm_model: Any, text_ref: Any) -> None:
    """A trained SDXL ControlNet steers the UNet with 10 residuals; guess mode scales them 0.825 ** (9 - i); a
    conditional-only control with both CFG halves in one batch equals the two halves run apart."""
    about, tensors = text_ref
    saved = {k: v.clone() for k, v in sgm_model.control_model.state_dict().items()}
    try:
        net = _random_control(sgm_model, 1)
        torch.manual_seed(0)
        x, t, hint = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.rand(2, 3, 128, 128)
        with torch.no_grad():
            cond = sgm_model.get_learned_conditioning(about["prompts"], _sizes(tensors["io.time_ids"]))
            uncond = sgm_model.get_unconditional_conditioning(2, _sizes(tensors["io.time_ids"]))
            raw = net(x=x, hint=hint, timesteps=t, context=cond["crossattn"], y=cond["vector"])
            assert len(raw) == 10
            assert Control(net, hint, weight=0.5, guess_mode=True).scales(10) == guess_mode_scales(10, 0.5)
            assert guess_mode_scales(10)[0] == pytest.approx(0.825 ** 9)
            unit = [Control(net, hint, control_mode="controlnet")]
            batched = ClassifierFreeGuidance(sgm_model.controlled_unet(unit), cond, uncond, 5.0)(x, t)
            apart = ClassifierFreeGuidance(sgm_model.controlled_unet(unit), cond, uncond, 5.0, batched=False)(x, t)
            plain = UNetWithControls(sgm_model.model.diffusion_model)(x, t, cond)
        assert rel_err(batched, apart) < 1e-5
        assert rel_err(sgm_model.controlled_unet(unit)(x, t, cond), plain) > 1e-3  # the control does steer
    finally:
        sgm_model.control_model.load_state_dict(saved)


def test_default_sizes_are_the_image_uncropped() -> None:
    sizes = default_sizes(2, 96, 64)
    assert sizes["original_size_as_tuple"].tolist() == [[96.0, 64.0]] * 2
    assert sizes["crop_coords_top_left"].tolist() == [[0.0, 0.0]] * 2
    assert sizes["target_size_as_tuple"].tolist() == [[96.0, 64.0]] * 2


def test_vector_is_required_and_refused_where_it_must_be(sgm_model: Any) -> None:
    unet = sgm_model.model.diffusion_model
    with pytest.raises(InputError, match="needs the vector conditioning y"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 77, 32))
    with pytest.raises(InputError, match="missing|needs 'original_size_as_tuple'"):
        sgm_model.conditioner({"txt": ["a"]})


def _logged_losses(out: Path) -> torch.Tensor:
    import csv

    with open(next(out.glob("logs/version_*/metrics.csv")), newline="") as f:
        return torch.tensor([float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")])


@pytest.mark.slow
def test_tiny_sdxl_add_control_train_resume_export_generate_as_a_user_runs_them(tmp_path: Path) -> None:
    """tool_add_control.py on an SDXL base (sgm's extra `denoiser.sigmas` in it) -> tutorial_train.py, stopped and
    resumed, and with --cache -> tool_export_control.py -> cldm.generate: the ControlNet starts as the UNet's encoder
    (label_emb included), the locked SDXL weights stay bit for bit, the resumed run equals the uninterrupted one, the
    cached run has its losses, and the exported control generates on its base with the micro-conditioning recorded."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model(XL_TINY)
    model.materialize()
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    trained_like(base)
    assert not any(k in base for k in ("betas", "alphas_cumprod"))  # SDXL files carry no schedule
    save_file({**base, "denoiser.sigmas": torch.rand(1000)}, str(tmp_path / "sdxl_base.safetensors"))
    run_script("training/make_fill50k.py", "--out", str(tmp_path / "data"), "--n", "4", "--size", "64", "--seed", "0")
    ini = tmp_path / "ini.safetensors"
    run_script("tool_add_control.py", str(tmp_path / "sdxl_base.safetensors"), str(ini), "--config", str(XL_TINY))
    initial = load_state_dict(ini)
    for name in ("label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"):
        assert torch.equal(initial["control_model." + name], base["model.diffusion_model." + name])

    def train(out: Path, *extra: str) -> None:
        run_script("tutorial_train.py", "--config", str(XL_TINY), "--resume_path", str(ini), "--data",
                   str(tmp_path / "data"), "--out", str(out), "--batch_size", "2", "--learning_rate", "1e-3",
                   "--logger_freq", "100", "--save_every", "2", *extra)

    train(tmp_path / "full", "--max_steps", "4")
    train(tmp_path / "cached", "--max_steps", "4", "--cache", str(tmp_path / "cache"))
    train(tmp_path / "part", "--max_steps", "2")
    train(tmp_path / "part", "--max_steps", "4", "--resume")
    full, part = load_state_dict(tmp_path / "full" / "last.ckpt"), load_state_dict(tmp_path / "part" / "last.ckpt")
    assert [k for k in full if not torch.equal(full[k], part[k])] == []
    # The cached run (no VAE or text encoder in its steps) has the uncached run's losses, step for step. (Not its
    # weights to float tolerance: Adam's first steps turn rounding-level gradient differences into lr-sized ones.)
    losses = [_logged_losses(tmp_path / run) for run in ("full", "cached")]
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    moved = [k for k in initial if not torch.equal(initial[k], full[k])]
    assert moved and all(k.startswith("control_model.") for k in moved)
    create_model(XL_TINY).load_state_dict(full)
    # ... then export it control-only (fp16) and generate with it on the base, with micro-conditioning
    control = tmp_path / "control_sdxl_mine.safetensors"
    run_script("tool_export_control.py", str(tmp_path / "full" / "last.ckpt"), str(control), "--config",
               str(XL_TINY))
    hint = next((tmp_path / "data" / "source").iterdir())
    image = tmp_path / "out.png"
    run_script("-m", "cldm.generate", "--config", str(XL_TINY), "--ckpt", str(control), "--base",
               str(tmp_path / "sdxl_base.safetensors"), "--prompt", "a red circle", "--image", str(hint),
               "--width", "64", "--height", "64", "--steps", "2", "--original_size", "128", "128", "--crop", "8",
               "0", "--out", str(image))
    from cldm.generate import read_record

    record = read_record(image)
    assert record["original_size"] == [128, 128] and record["crop_top_left"] == [8, 0]


def test_sd15_control_onto_sdxl_is_refused_naming_both_families(tmp_path: Path) -> None:
    """A full-size SD1.5 ControlNet (text width 768) does not go onto the SDXL config: one line, both families."""
    from cldm.checkpoint import check_control_fits

    control = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    expected = {"input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048)}
    with pytest.raises(CheckpointMismatchError, match=r"SD1\.x model \(text width 768\).*SDXL model \(text width "
                                                      r"2048\)"):
        check_control_fits(control, expected, "sd15_control.safetensors", "models/cldm_xl.yaml")


# ----- generation: the pipeline with SDXL's micro-conditioning ------------------------------------------------
def test_unconditional_is_zero_text_with_the_size_embeddings(sgm_model: Any, unet_ref: Any) -> None:
    """SDXL's empty negative prompt is zeros for both encoders' text (sgm's force_zero_embeddings, diffusers'
    force_zeros_for_empty_prompt); the size embeddings stay."""
    sizes = _sizes(unet_ref[1]["io.time_ids"])
    with torch.no_grad():
        uncond = sgm_model.get_unconditional_conditioning(2, sizes)
    assert not uncond["crossattn"].any()
    assert not uncond["vector"][:, :24].any()  # bigG's pooled width in the tiny config
    embedded = torch.cat([ConcatTimestepEmbedderND(8)(v) for v in sizes.values()], 1)
    assert torch.equal(uncond["vector"][:, 24:], embedded)


def test_pipeline_generates_with_micro_conditioning_and_records_it(sgm_model: Any) -> None:
    import numpy as np

    from cldm.generation import ControlNetPipeline, ControlUnit

    saved = {k: v.clone() for k, v in sgm_model.control_model.state_dict().items()}
    try:
        _random_control(sgm_model, 2)
        pipeline = ControlNetPipeline(sgm_model)
        hint = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
        unit = ControlUnit(hint, weight=1.0, control_mode="controlnet")
        common = dict(width=64, height=64, steps=2, cfg_scale=3.0, seed=0, progress=False)
        default = pipeline("a cat", [unit], **common)
        same = pipeline("a cat", [unit], original_size=(64, 64), crop_top_left=(0, 0), target_size=(64, 64),
                        **common)
        other = pipeline("a cat", [unit], original_size=(1024, 512), crop_top_left=(16, 48), **common)
    finally:
        sgm_model.control_model.load_state_dict(saved)
    pixels = [np.asarray(r.images[0], dtype=np.int16) for r in (default, same, other)]
    assert np.array_equal(pixels[0], pixels[1])  # the defaults are the output size, uncropped
    assert np.abs(pixels[0] - pixels[2]).max() > 0  # the micro-conditioning reaches the model
    assert other.settings["original_size"] == [1024, 512] and other.settings["crop_top_left"] == [16, 48]
    assert default.settings["target_size"] == [64, 64]


def test_micro_conditioning_is_refused_for_sd() -> None:
    from cldm.generation import ControlNetPipeline

    model = create_model(ROOT / "models" / "cldm_tiny.yaml")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("control_model.") for name in trainable)
    with pytest.raises(InputError, match="SDXL's micro-conditioning"):
        ControlNetPipeline(model)("a cat", [], width=64, height=64, steps=1, original_size=(64, 64), progress=False)
    # A pipeline leaves the model's trainable weights trainable (a model in training can be sampled).
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable


# ----- export: diffusers' own ControlNetModel computes our 10 residuals ---------------------------------------
def _diffusers_unet(model: Any, config: dict[str, Any]) -> Any:
    """`model`'s UNet as a diffusers UNet2DConditionModel, converted by diffusers' own single-file code."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
    unet = diffusers.UNet2DConditionModel(**config)
    missing, unexpected = unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet.config), strict=False)
    assert (missing, unexpected) == ([], [])
    return unet.eval()


def test_diffusers_folder_of_an_sdxl_control_gives_our_residuals(sgm_model: Any, unet_ref: Any,
                                                                  tmp_path: Path) -> None:
    """Our tiny SDXL ControlNet -> `tool_export_control.py --format diffusers` -> diffusers.ControlNetModel: the same
    10 residuals (its add_embedding from our label_emb: the folder is complete, unlike diffusers' own single-file
    conversion of such a file), and with them diffusers' UNet2DConditionModel gives our controlled output; read
    back, the folder is our ControlNet bit for bit."""
    import diffusers

    import tool_export_control
    from cldm.checkpoint import control_weights

    saved = {k: v.clone() for k, v in sgm_model.control_model.state_dict().items()}
    try:
        net = _random_control(sgm_model, 3)
        torch.save({"state_dict": {"control_model." + k: v for k, v in net.state_dict().items()}},
                   tmp_path / "last.ckpt")
        assert tool_export_control.main([str(tmp_path / "last.ckpt"), str(tmp_path / "folder"), "--format",
                                         "diffusers", "--dtype", "fp32", "--config", str(XL_TINY)]) == 0
        theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True).eval()
        written = load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
        assert written.keys() == theirs.state_dict().keys()
        assert {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias"} <= written.keys()
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900])
        context, pooled = torch.randn(2, 77, 32, generator=g), torch.randn(2, 24, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 48, 896, 1152]])
        hint = torch.rand(2, 3, 128, 128, generator=g)
        y = torch.cat([pooled] + [ConcatTimestepEmbedderND(8)(v) for v in _sizes(time_ids).values()], 1)
        with torch.no_grad():
            ours = net(x=x, hint=hint, timesteps=t, context=context, y=y)
            down, mid = theirs(sample=x, timestep=t, encoder_hidden_states=context, controlnet_cond=hint,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
        assert len(ours) == len([*down, mid]) == 10
        for i, (a, b) in enumerate(zip(ours, [*down, mid])):
            assert rel_err(b, a) < TOLERANCE, i
        # The controlled output: diffusers' UNet (the tiny SDXL UNet as diffusers' own converter makes it) steered
        # by those residuals equals our controlled UNet's eps.
        unet = _diffusers_unet(sgm_model, unet_ref[0]["diffusers_config"])
        with torch.no_grad():
            eps = sgm_model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint], "y": [y]})
            their_eps = unet(x, t, encoder_hidden_states=context, return_dict=False,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                             down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
        assert rel_err(their_eps, eps) < TOLERANCE
        back = control_weights(load_state_dict(tmp_path / "folder"), tmp_path / "folder")
        assert back.keys() == net.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    finally:
        sgm_model.control_model.load_state_dict(saved)


def _diffusers_sdxl_pipeline(model: Any, unet_config: dict[str, Any], folder: Path) -> Path:
    """`model` as a diffusers StableDiffusionXLPipeline folder, each part converted by diffusers' own single-file
    code and saved by diffusers and transformers themselves."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = model.state_dict()
    _diffusers_unet(model, unet_config).save_pretrained(folder / "unet", max_shard_size="300KB")  # as SDXL's fp32
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4,
                                  layers_per_block=1, latent_channels=4)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae.config), strict=True)
    vae.save_pretrained(folder / "vae")
    common = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  vocab_size=49408, max_position_embeddings=77)
    clip = CLIPTextModel(CLIPTextConfig(**common, hidden_act="quick_gelu"))
    clip_state = convert_ldm_clip_checkpoint(state, "conditioner.embedders.0.transformer.")
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers 5 names it without that level
        clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    clip.load_state_dict(clip_state, strict=True)
    clip.save_pretrained(folder / "text_encoder")
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_act="gelu", projection_dim=24))
    bigg.load_state_dict(convert_open_clip_checkpoint(bigg, state, "conditioner.embedders.1.model."), strict=True)
    bigg.save_pretrained(folder / "text_encoder_2")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_CONFIG))
    return folder


def test_a_diffusers_sdxl_pipeline_is_a_base_holding_the_same_weights(sgm_model: Any, unet_ref: Any,
                                                                      tmp_path: Path) -> None:
    """tool_add_control.py on a diffusers SDXL pipeline folder (made from the tiny SDXL model by diffusers' own
    converters): every UNet, VAE and text-encoder tensor is the model's own, bit for bit (diffusers keeps no
    `logit_scale`: zero, read by no conditioning); the pooled vector is transformers' text_embeds."""
    from transformers import CLIPTextModelWithProjection

    folder = _diffusers_sdxl_pipeline(sgm_model, unet_ref[0]["diffusers_config"], tmp_path / "sdxl_diffusers")
    assert len(list((folder / "unet").glob("*-of-*.safetensors"))) > 1  # read by their index
    run_script("tool_add_control.py", str(folder), str(tmp_path / "ini.safetensors"), "--config", str(XL_TINY))
    read = load_file(tmp_path / "ini.safetensors")
    ours = {k: v for k, v in sgm_model.state_dict().items() if k.startswith(("model.", "first_stage_model.",
                                                                             "conditioner."))}
    assert ours.keys() <= read.keys()
    differing = [k for k, v in ours.items() if not torch.equal(read[k], v)]
    assert differing == ["conditioner.embedders.1.model.logit_scale"]
    model = create_model(XL_TINY)
    model.load_state_dict(read)
    bigg = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    embedder = model.conditioner.embedders[1]
    ids = embedder.tokenize(["a house by the sea", ""])
    with torch.no_grad():
        assert rel_err(embedder.encode_tokens(ids)[1], bigg(input_ids=ids).text_embeds) < TOLERANCE


def test_sdxl_pipelines_this_project_cannot_hold_are_refused_plainly(sgm_model: Any, unet_ref: Any,
                                                                      tmp_path: Path) -> None:
    """A refiner (no text_encoder/), and a base trained with another schedule or prediction (an SDXL checkpoint
    carries no schedule: it would be read as SDXL's), are one-line errors naming the file."""
    from cldm.checkpoint import CheckpointError, read_checkpoint

    (tmp_path / "refiner" / "text_encoder_2").mkdir(parents=True)
    (tmp_path / "refiner" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="an SDXL refiner pipeline"):
        read_checkpoint(tmp_path / "refiner")
    folder = _diffusers_sdxl_pipeline(sgm_model, unet_ref[0]["diffusers_config"], tmp_path / "vpred")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match=f"{scheduler}: prediction_type 'v_prediction'; SDXL bases"):
        read_checkpoint(folder)


def test_what_sdxl_does_not_support_yet_is_refused_plainly(sgm_model: Any) -> None:
    from cldm.formats import diffusers_config

    with pytest.raises(InputError, match="needs the size embedding width"):
        diffusers_config(sgm_model.control_model)


def _paired_folder(root: Path, n: int, height: int, width: int) -> Path:
    """A prompt.json data set of `n` random height x width pairs, prompts "a cat" and "a dog"."""
    import numpy as np
    from PIL import Image

    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        for part in ("source", "target"):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / part / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": "a cat" if i % 2 else "a dog"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def test_cache_holds_both_encoders_text_and_each_items_sizes(tmp_path: Path, sgm_model: Any) -> None:
    """--cache on SDXL: each prompt's two-encoder context and pooled vector are stored once; a cached item keeps its
    size conditionings (96 x 64 centre-cropped to 32 x 32: original (64, 96), crop (0, 8)); a cached step's
    conditioning equals the uncached one's and its loss too (the VAE's moments are sampled with the same RNG)."""
    from torch.utils.data import default_collate

    from training.cache import CachedDataset, build_cache, cached_batch_encoder, model_fingerprint
    from training.dataset import open_dataset
    from training.geometry import Geometry

    folder = _paired_folder(tmp_path / "data", 3, 64, 96)
    items = open_dataset(folder, geometry=Geometry(resolution=32, crop="center"), size_conditioning=True, seed=0)
    report = build_cache(sgm_model, items, tmp_path / "cache", batch_size=2)
    assert (report.items, report.encoded, report.prompts, report.prompts_encoded) == (3, 3, 3, 3)  # "" too
    assert build_cache(sgm_model, items, tmp_path / "cache").encoded == 0
    cached = CachedDataset(items, tmp_path / "cache", model_fingerprint(sgm_model))
    item = cached[1]
    assert set(item) == {"latent_moments", "context", "hint", "txt", *SIZE_KEYS}
    text = sgm_model.text_encodings(["a cat"])
    assert item["context"].keys() == text.keys() == {"crossattn", "vector"}
    assert torch.equal(item["context"]["crossattn"], text["crossattn"][0])
    assert torch.equal(item["context"]["vector"], text["vector"][0])
    assert item["original_size_as_tuple"].tolist() == [64.0, 96.0]
    assert item["crop_coords_top_left"].tolist() == [0.0, 8.0]
    assert item["target_size_as_tuple"].tolist() == [32.0, 32.0]
    uncached_batch = default_collate([items[i] for i in (0, 1)])
    cached_batch = default_collate([cached[i] for i in (0, 1)])
    default = sgm_model.batch_encoder
    results = []
    try:
        for batch, encoder in ((uncached_batch, default), (cached_batch, cached_batch_encoder)):
            sgm_model.batch_encoder = encoder
            with torch.no_grad():
                _, cond = sgm_model.get_input(batch, "jpg")
                torch.manual_seed(1)
                loss, _ = sgm_model.shared_step(batch)
            results.append((cond, loss))
    finally:
        sgm_model.batch_encoder = default
    (plain, plain_loss), (from_cache, cached_loss) = results
    torch.testing.assert_close(from_cache["c_crossattn"][0], plain["c_crossattn"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_cache["y"][0], plain["y"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-6)


def test_image_logging_samples_sdxl(sgm_model: Any) -> None:
    """ControlLDM.log_images (what ImageLogger calls) on an SDXL batch: sizes from the images, CFG with zero text."""
    g = torch.Generator().manual_seed(0)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=g) * 2 - 1, "hint": torch.rand(2, 64, 64, 3, generator=g),
             "txt": ["a red circle", "a blue circle"]}
    torch.manual_seed(0)
    with torch.no_grad():
        log = sgm_model.log_images(batch, N=2, ddim_steps=2, unconditional_guidance_scale=3.0)
    assert log["samples_cfg_scale_3.00"].shape == (2, 3, 64, 64)
    assert torch.isfinite(log["samples_cfg_scale_3.00"]).all()


# ----- training data: each item's own size and crop -----------------------------------------------------------
def test_items_carry_their_original_size_crop_and_target_size(tmp_path: Path, sgm_model: Any) -> None:
    """With size conditioning (tutorial_train sets it for SDXL), a random 32 x 32 crop of a 96 x 64 image says
    original (64, 96), its real (top, left) in the 48 x 32 resized image, target (32, 32); the batch's sizes are
    what the conditioner embeds."""
    import numpy as np
    from PIL import Image

    from training.dataset import open_dataset
    from training.geometry import Geometry

    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        for part in ("source", "target"):
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / part / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "a cat"}))
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    geometry = Geometry(resolution=32, crop="random")
    items = open_dataset(tmp_path, geometry=geometry, size_conditioning=True, seed=0)
    plain = open_dataset(tmp_path, geometry=geometry, seed=0)
    assert "crop_coords_top_left" not in plain[0]  # SD1.x/2.x items stay the original's
    lefts = set()
    for index in range(3):
        item = items[index]
        assert item["original_size_as_tuple"].tolist() == [64.0, 96.0]
        assert item["target_size_as_tuple"].tolist() == [32.0, 32.0]
        top, left = item["crop_coords_top_left"].tolist()
        assert top == 0.0 and 0 <= left <= 16  # 96 x 64 resized to 48 x 32: only a horizontal crop
        _, _, placement = items.placed(index)
        assert placement.crop_offset == (int(left), int(top))
        lefts.add(left)
    assert len(lefts) > 1  # the crops really are random, and reported as they are
    batch = {k: torch.stack([torch.as_tensor(items[i][k]) for i in range(2)]) for k in ("jpg", "hint")}
    batch.update({k: torch.stack([torch.as_tensor(items[i][k]) for i in range(2)]) for k in SIZE_KEYS})
    batch["txt"] = ["a cat", "a cat"]
    with torch.no_grad():
        _, cond = sgm_model.get_input(batch, "jpg")
        expected = sgm_model.get_learned_conditioning(["a cat"] * 2, {k: batch[k] for k in SIZE_KEYS})
    assert torch.equal(cond["y"][0], expected["vector"])


def test_fidelity_generation_samples_sdxl_with_the_images_sizes_and_zero_text(sgm_model: Any) -> None:
    """training.fidelity.generate (the fidelity callback's sampler) on SDXL is `sample_latents` with the prompts at
    the images' own size and SDXL's unconditional (zero text): the same images, bit for bit."""
    import numpy as np

    from cldm.control import Control
    from training.fidelity import generate, item_noise

    saved = {k: v.clone() for k, v in sgm_model.control_model.state_dict().items()}
    try:
        _random_control(sgm_model, 4)
        hints = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
        prompts = ["a red circle", "a blue circle"]
        images = generate(sgm_model, prompts, hints, seed=0, ddim_steps=2, guidance_scale=3.0)
        with torch.no_grad():
            sizes = default_sizes(2, 64, 64)
            x = torch.stack([item_noise((4, 8, 8), 0, i) for i in range(2)])
            control = Control(sgm_model.control_model, torch.from_numpy(hints).permute(0, 3, 1, 2))
            z = sgm_model.sample_latents(x, sgm_model.get_learned_conditioning(prompts, sizes), [control],
                                         sgm_model.get_unconditional_conditioning(2, sizes), 3.0, steps=2)
            expected = ((sgm_model.decode_first_stage(z).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    finally:
        sgm_model.control_model.load_state_dict(saved)
    assert np.array_equal(images, expected)


def test_streamed_sdxl_items_keep_their_sizes_in_the_batch(tmp_path: Path) -> None:
    """A WebDataset stream with size conditioning: every batch carries the three size keys, with the real crop."""
    import numpy as np
    from PIL import Image

    from training.geometry import Geometry
    from training.make_webdataset import shard_pattern, write_shards
    from training.sources import PromptJsonSource
    from training.streaming import ShardStream

    (tmp_path / "d" / "source").mkdir(parents=True)
    (tmp_path / "d" / "target").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        for part in ("source", "target"):
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "d" / part / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "a cat"}))
    (tmp_path / "d" / "prompt.json").write_text("\n".join(lines) + "\n")
    shards = shard_pattern(write_shards(PromptJsonSource(tmp_path / "d"), tmp_path / "shards", shard_size=4))
    stream = ShardStream(shards, batch_size=4, geometry=Geometry(resolution=32, crop="random"), seed=0,
                         size_conditioning=True)
    batch = next(iter(stream.loader()))
    assert batch["original_size_as_tuple"].tolist() == [[64.0, 96.0]] * 4
    assert batch["target_size_as_tuple"].tolist() == [[32.0, 32.0]] * 4
    crops = batch["crop_coords_top_left"]
    assert crops.shape == (4, 2) and (crops[:, 0] == 0).all() and (crops[:, 1] <= 16).all()
    assert len(set(crops[:, 1].tolist())) > 1
    plain = next(iter(ShardStream(shards, batch_size=4, geometry=Geometry(resolution=32), seed=0).loader()))
    assert "crop_coords_top_left" not in plain


def test_transfer_control_moves_an_sdxl_control_onto_a_community_model(tmp_path: Path) -> None:
    """tool_transfer_control on SDXL: control + (target - base) for every ControlNet tensor with a UNet counterpart,
    label_emb included; the hint block and zero convs as they are; the target's own SDXL weights otherwise."""
    from safetensors.torch import save_file

    import tool_transfer_control

    torch.manual_seed(0)
    model = create_model(XL_TINY)
    model.materialize()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trained_like(state)
    base = {k: v for k, v in state.items() if not k.startswith("control_model.")}
    target = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
    control = {k: v for k, v in state.items() if k.startswith("control_model.")}
    for name, tensors in (("base", base), ("target", target), ("control", control)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    tool_transfer_control.transfer_control(tmp_path / "base.safetensors", tmp_path / "control.safetensors",
                                           tmp_path / "target.safetensors", tmp_path / "out.safetensors", XL_TINY)
    out = load_state_dict(tmp_path / "out.safetensors")
    for name in ("label_emb.0.0.weight", "input_blocks.4.1.proj_in.weight"):
        expected = control["control_model." + name] + (target["model.diffusion_model." + name]
                                                       - base["model.diffusion_model." + name])
        torch.testing.assert_close(out["control_model." + name], expected)
    assert torch.equal(out["control_model.zero_convs.3.0.weight"], control["control_model.zero_convs.3.0.weight"])
    assert torch.equal(out["conditioner.embedders.1.model.text_projection"],
                       target["conditioner.embedders.1.model.text_projection"])


# ----- memory options and several units on SDXL -----------------------------------------------------------------
def test_frozen_weights_half_holds_sdxl_in_bf16_with_exact_checkpoints(sgm_model: Any) -> None:
    """`--frozen_weights half` on SDXL: the UNet, both text encoders and the VAE held in bf16, the ControlNet in
    float32; state_dict() still the full-precision weights bit for bit; a bf16-autocast training step close to one
    with full-precision weights (autocast casts them to bf16 anyway), gradients in float32."""
    model = create_model(XL_TINY)
    model.load_state_dict(sgm_model.state_dict())
    model.train()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=g) * 2 - 1, "hint": torch.rand(2, 64, 64, 3, generator=g),
             "txt": ["a red circle", "a blue circle"]}

    def step() -> tuple[float, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.shared_step(batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.control_model.parameters()])
        assert grads.dtype == torch.float32
        return loss.item(), grads

    loss_full, grads_full = step()
    model.hold_frozen_weights_in(torch.bfloat16)
    for frozen in (model.model.diffusion_model, model.conditioner, model.first_stage_model):
        assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.control_model.parameters()} == {torch.float32}
    saved = model.state_dict()
    assert [k for k in full if saved[k].dtype != full[k].dtype or not torch.equal(saved[k], full[k])] == []
    loss_half, grads_half = step()
    assert abs(loss_half - loss_full) <= 0.02 * loss_full
    assert rel_err(grads_half, grads_full) < 0.05


def test_two_sdxl_units_low_vram_and_a_zero_weight_unit(sgm_model: Any) -> None:
    """Multi-ControlNet on SDXL: two ControlNets' 10 residuals add up (a second unit at weight 0 changes nothing,
    bit for bit; at weight 1 it changes the image); low VRAM (parts moved in turn) gives the same image."""
    import copy

    import numpy as np

    from cldm.generation import ControlNetPipeline, ControlUnit

    saved = {k: v.clone() for k, v in sgm_model.control_model.state_dict().items()}
    try:
        first, second = (copy.deepcopy(_random_control(sgm_model, seed)) for seed in (4, 5))
        pipeline = ControlNetPipeline(sgm_model, controls=[first, second], control_names=["a", "b"])
        rng = np.random.default_rng(0)
        hints = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(2)]
        common = dict(steps=2, cfg_scale=3.0, seed=0, progress=False)

        def image(*units: ControlUnit, low_vram: bool = False) -> np.ndarray:
            result = pipeline("a cat", list(units), low_vram=low_vram, **common)
            assert result.images[0].size == (64, 64)  # the tiny config's own size (cldm_xl.yaml's: 1024)
            return np.asarray(result.images[0], dtype=np.int16)

        one = image(ControlUnit(hints[0], model="a"))
        with_zero = image(ControlUnit(hints[0], model="a"), ControlUnit(hints[1], model="b", weight=0.0))
        both = image(ControlUnit(hints[0], model="a"), ControlUnit(hints[1], model="b"))
        both_low_vram = image(ControlUnit(hints[0], model="a"), ControlUnit(hints[1], model="b"), low_vram=True)
    finally:
        sgm_model.control_model.load_state_dict(saved)
    assert np.array_equal(one, with_zero)
    assert np.abs(both - one).max() > 0
    assert np.array_equal(both, both_low_vram)
