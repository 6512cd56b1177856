"""Export and import of ControlNets, proven with the other side's own loader: diffusers' ControlNetModel (folder and
single-file converter), the web UI's difference arithmetic, and our own generation and tools reading every layout.

diffusers is the independent reference here (written by others, installed by the test set-up); the project itself
never imports it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import diffusers  # a test dependency (pip install -e .[test]): these tests never skip
import pytest
import torch
from conftest import REFERENCE_DIR, ROOT, TINY, rel_err
from launcher import run_command
from omegaconf import OmegaConf
from safetensors.torch import load_file

import tool_export_control
from cldm.checkpoint import CONTROL_PREFIX, UNET_PREFIX, control_weights, load_state_dict, unet_weights
from cldm.formats import DIFFERENCE_KEY, EncoderLayout, from_diffusers, read_metadata, to_diffusers
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

#: The tiny config's ControlNet, and one shaped like SD2.x's (heads from num_head_channels, linear projections).
VARIANTS = {"v15": {}, "v21": {"num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}}


def control_config(config: str | Path, **overrides: Any) -> Any:
    params = OmegaConf.load(config).model.params.control_stage_config
    params.params = OmegaConf.merge(params.params, overrides)
    return params


def random_control_net(config: Any, seed: int) -> torch.nn.Module:
    """A ControlNet with every weight random (also the zero convs: a fresh one outputs only zeros)."""
    torch.manual_seed(seed)
    net = instantiate_from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if p.dim() > 1 else 0.02))
    return net.eval()


def inputs(net: torch.nn.Module, latent: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = net.spec.context_dim
    return {"x": torch.randn(2, 4, latent, latent, generator=g), "t": torch.tensor([10, 900]),
            "context": torch.randn(2, 77, context, generator=g),
            "hint": torch.rand(2, 3, 8 * latent, 8 * latent, generator=g)}


def ours(net: torch.nn.Module, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return net(x=inp["x"], hint=inp["hint"], timesteps=inp["t"], context=inp["context"])


def theirs(model: Any, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = model(sample=inp["x"], timestep=inp["t"], encoder_hidden_states=inp["context"],
                          controlnet_cond=inp["hint"], return_dict=False)
    return [*down, mid]


def assert_same_residuals(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: float = 1e-5) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, i
        assert rel_err(x, y) < tolerance, (i, rel_err(x, y))


def save_full_checkpoint(path: Path, net: torch.nn.Module, unet: dict[str, torch.Tensor] | None = None) -> Path:
    state = {CONTROL_PREFIX + k: v for k, v in net.state_dict().items()}
    if unet is not None:
        state.update({UNET_PREFIX + k: v for k, v in unet.items()})
    torch.save({"state_dict": state, "global_step": 1234}, path)
    return path


def export(*argv: str) -> None:
    assert tool_export_control.main(list(argv)) == 0


# ----- ours -> diffusers: the residuals diffusers computes from our export -----------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_folder_gives_our_residuals(variant: str, tmp_path: Path) -> None:
    config = control_config(TINY, **VARIANTS[variant])
    net = random_control_net(config, seed=1)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    config_file = tmp_path / "config.yaml"
    full = OmegaConf.load(TINY)
    full.model.params.control_stage_config = config
    OmegaConf.save(full, config_file)
    export(str(src), str(tmp_path / "folder"), "--format", "diffusers", "--dtype", "fp32", "--config",
           str(config_file))
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True).eval()
    inp = inputs(net, latent=8)
    assert_same_residuals(theirs(model, inp), ours(net, inp))
    loaded = load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    assert loaded.keys() == model.state_dict().keys()  # complete: nothing left at diffusers' random init


@pytest.mark.slow
def test_full_size_sd15_diffusers_folder_gives_our_residuals(tmp_path: Path) -> None:
    net = random_control_net(control_config(ROOT / "models" / "cldm_v15.yaml"), seed=2)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    export(str(src), str(tmp_path / "folder"), "--format", "diffusers", "--dtype", "fp32")
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True).eval()
    inp = {k: v[:1] for k, v in inputs(net, latent=32).items()}  # a 32x32 latent, a 256 px hint
    assert_same_residuals(theirs(model, inp), ours(net, inp))


def test_control_only_export_read_by_diffusers_single_file_converter(tmp_path: Path) -> None:
    """diffusers' own single-file route, offline: `from_single_file(file, config=<a folder with the config>)`."""
    net = random_control_net(control_config(TINY), seed=3)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    export(str(src), str(tmp_path / "control.safetensors"), "--dtype", "fp32", "--config", TINY)
    export(str(src), str(tmp_path / "folder"), "--format", "diffusers", "--dtype", "fp32", "--config", TINY)
    model = diffusers.ControlNetModel.from_single_file(str(tmp_path / "control.safetensors"),
                                                       config=str(tmp_path / "folder"), local_files_only=True)
    inp = inputs(net, latent=8)
    assert_same_residuals(theirs(model.eval(), inp), ours(net, inp))


# ----- diffusers -> ours, both directions ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_round_trip_is_bit_exact(variant: str, tmp_path: Path) -> None:
    net = random_control_net(control_config(TINY, **VARIANTS[variant]), seed=4)
    ours_state = net.state_dict()
    layout = EncoderLayout.of(net)
    back = from_diffusers(to_diffusers(ours_state, layout))
    assert back.keys() == ours_state.keys()
    assert all(torch.equal(back[k], v) for k, v in ours_state.items())


def test_a_diffusers_made_controlnet_loads_as_ours(tmp_path: Path) -> None:
    """A ControlNetModel that diffusers builds and saves itself reads into our ControlNet with its residuals."""
    net = random_control_net(control_config(TINY), seed=5)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    export(str(src), str(tmp_path / "folder"), "--format", "diffusers", "--dtype", "fp32", "--config", TINY)
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    fresh = instantiate_from_config(control_config(TINY)).eval()
    fresh.load_state_dict(control_weights(load_state_dict(tmp_path / "theirs"), "theirs"), strict=True)
    inp = inputs(fresh, latent=8)
    assert_same_residuals(theirs(model.eval(), inp), ours(fresh, inp))


# ----- fp16, sizes, metadata -------------------------------------------------------------------------------------
def test_fp16_export_is_within_fp16_tolerance_and_the_expected_size(tmp_path: Path) -> None:
    net = random_control_net(control_config(TINY), seed=6)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    out = tmp_path / "control_fp16.safetensors"
    export(str(src), str(out), "--config", TINY)  # fp16 is the default
    state = load_file(out)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert all(k.startswith(CONTROL_PREFIX) for k in state)
    half = instantiate_from_config(control_config(TINY)).eval()
    half.load_state_dict({k[len(CONTROL_PREFIX):]: v.float() for k, v in state.items()})
    inp = inputs(net, latent=8)
    assert_same_residuals(ours(half, inp), ours(net, inp), tolerance=5e-3)
    header = struct.unpack("<Q", out.read_bytes()[:8])[0]
    data = sum(p.numel() * 2 for p in net.state_dict().values())
    assert out.stat().st_size == 8 + header + data


def test_full_size_sd15_control_only_fp16_is_072_gb() -> None:
    """From the released layout (no full-size write): the control_model.* tensors of SD1.5 at 2 bytes each."""
    layout = json.loads((REFERENCE_DIR / "checkpoint_layout_unet_control_vae.json").read_text())["v15"]
    numel = [torch.Size(shape).numel() for key, shape in layout.items() if key.startswith(CONTROL_PREFIX)]
    assert 0.71e9 < 2 * sum(numel) < 0.73e9


def test_metadata_travels_in_the_header_and_info_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    net = random_control_net(control_config(TINY), seed=7)
    unet = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("input_blocks.", "time_embed."))}
    src = save_full_checkpoint(tmp_path / "last.ckpt", net, unet)
    out = tmp_path / "control.safetensors"
    export(str(src), str(out), "--config", TINY)
    meta = read_metadata(out)
    assert meta["format"] == "control" and meta["dtype"] == "fp16" and meta["steps"] == "1234"
    assert meta["family"] == "a model with text width 32" and len(meta["base_unet_sha256"]) == 64
    assert json.loads(meta["config"])["target"] == "cldm.cldm.ControlNet"
    assert "tool_export_control.py" in meta["command"]
    capsys.readouterr()
    export("--info", str(out))
    shown = capsys.readouterr().out
    assert "steps: 1234" in shown and "float16" in shown and "base_unet_sha256" in shown


# ----- the web UI's difference layout ------------------------------------------------------------------------
def test_difference_export_plus_its_base_is_the_control_exactly(tmp_path: Path) -> None:
    """As a trained control is: its encoder copied from the base UNet, then moved by training (by ~1% here)."""
    net = random_control_net(control_config(TINY), seed=8)
    unet = {k: v.clone() for k, v in net.state_dict().items()
            if k.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01 * p.abs().mean())
    control = net.state_dict()
    src = save_full_checkpoint(tmp_path / "last.ckpt", net, unet)
    out = tmp_path / "control_diff.safetensors"
    export(str(src), str(out), "--diff", "--dtype", "fp32", "--config", TINY)
    diff = load_file(out)
    assert DIFFERENCE_KEY in diff
    # as the web UI loads it: p + the base UNet's tensor, for every ControlNet key the UNet has
    rebuilt = {k[len(CONTROL_PREFIX):]: v + unet[k[len(CONTROL_PREFIX):]] if k[len(CONTROL_PREFIX):] in unet else v
               for k, v in diff.items() if k.startswith(CONTROL_PREFIX)}
    assert rebuilt.keys() == control.keys()
    assert all(torch.equal(rebuilt[k], control[k]) for k in control)
    ours_rebuilt = control_weights(diff, out, unet)
    assert ours_rebuilt.keys() == control.keys() and all(torch.equal(ours_rebuilt[k], control[k]) for k in control)


# ----- import: every command that takes a control file reads every layout ---------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ControlLDM checkpoint whose control was made as tool_add_control makes one (its encoder a copy of the
    UNet's) and then moved as training moves it, and that control in every exported layout."""
    from cldm.model import create_model

    tmp = tmp_path_factory.mktemp("exports")
    torch.manual_seed(10)
    model = create_model(TINY)
    model.materialize()
    unet = model.model.diffusion_model.state_dict()
    with torch.no_grad():
        for name, p in model.control_model.named_parameters():
            if name in unet and unet[name].shape == p.shape:
                p.copy_(unet[name])
            p.add_(torch.randn_like(p) * 0.01 * (p.abs().mean() + 1e-3))
    state = model.state_dict()
    paths = {"full": tmp / "last.ckpt", "base": tmp / "sd.ckpt"}
    torch.save({"state_dict": state, "global_step": 5}, paths["full"])
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith(CONTROL_PREFIX)}}, paths["base"])
    for name, extra in (("control", []), ("diff", ["--diff"]), ("diffusers", ["--format", "diffusers"])):
        paths[name] = tmp / (name if name == "diffusers" else f"{name}.safetensors")
        export(str(paths["full"]), str(paths[name]), "--dtype", "fp32", "--config", TINY, *extra)
    return paths


@pytest.mark.parametrize("layout", ["control", "diff", "diffusers"])
def test_generation_reads_every_layout(trained: dict[str, Path], layout: str) -> None:
    from cldm.generation import ControlNetPipeline

    full = ControlNetPipeline.from_checkpoints(TINY, trained["full"])
    split = ControlNetPipeline.from_checkpoints(TINY, trained[layout], base=trained["base"])
    a, b = full.model.control_model.state_dict(), split.model.control_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_add_control_starts_from_an_existing_control(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ini.ckpt"
    result = run_command(["tool_add_control.py", str(trained["base"]), str(out), "--config", TINY,
                          "--control", str(trained["diffusers"])], cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    made, full = load_state_dict(out), load_state_dict(trained["full"])
    assert made.keys() == full.keys()
    assert all(torch.equal(made[k], full[k]) for k in full)


# ----- bad input -------------------------------------------------------------------------------------------------
def test_export_refusals_are_one_line(trained: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(trained["full"].read_bytes()[:5000])
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"precious")
    cases = [
        ([str(trained["base"]), str(tmp_path / "a.safetensors"), "--config", TINY], "not a ControlNet"),
        ([str(trained["full"]), str(tmp_path / "b.safetensors"), "--config", str(ROOT / "models" / "cldm_v15.yaml")],
         "text width 32"),
        ([str(truncated), str(tmp_path / "c.safetensors")], str(truncated)),
        ([str(trained["full"]), str(existing), "--config", TINY], "already exists"),
        ([str(trained["diff"]), str(tmp_path / "d.safetensors"), "--config", TINY], "--base"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert tool_export_control.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (argv, err)
    assert existing.read_bytes() == b"precious"
    assert not any((tmp_path / name).exists() for name in ("a.safetensors", "b.safetensors", "c.safetensors"))


def test_unet_weights_and_control_weights_agree_with_the_prefixes(trained: dict[str, Path]) -> None:
    state = load_state_dict(trained["full"])
    assert all(UNET_PREFIX + k in state for k in unet_weights(state))
    assert all(CONTROL_PREFIX + k in state for k in control_weights(state, "full"))


# ----- a diffusers Stable Diffusion pipeline folder as the base --------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.x pipeline that diffusers and transformers build and save themselves, shaped as cldm_tiny.yaml."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("pipeline") / "sd_tiny_diffusers"
    torch.manual_seed(11)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4,
                                  layers_per_block=1, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    with torch.no_grad():  # no part left at an all-zero initialisation, so that every weight is seen
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def test_a_diffusers_pipeline_is_a_base_for_add_control_and_computes_what_diffusers_does(
        pipeline_folder: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    from cldm.model import create_model

    out = tmp_path / "ini.ckpt"
    result = run_command(["tool_add_control.py", str(pipeline_folder), str(out), "--config", TINY], cwd=ROOT,
                         timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    model = create_model(TINY)
    model.load_state_dict(load_state_dict(out))
    model.eval()
    g = torch.Generator().manual_seed(12)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 77, 32, generator=g)
    unet = diffusers.UNet2DConditionModel.from_pretrained(pipeline_folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(pipeline_folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(pipeline_folder / "text_encoder").eval()
    with torch.no_grad():
        assert rel_err(model.model.diffusion_model(x, t, context=context),
                       unet(x, t, encoder_hidden_states=context).sample) < 1e-5
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert rel_err(model.first_stage_model.encode(image).mean, vae.encode(image).latent_dist.mean) < 1e-5
        assert rel_err(model.first_stage_model.decode(x[:1]), vae.decode(x[:1]).sample) < 1e-5
        ids = model.cond_stage_model.tokenize(["a red circle", ""])
        assert rel_err(model.cond_stage_model.encode_tokens(ids), text(input_ids=ids).last_hidden_state) < 1e-5


def test_generation_takes_a_diffusers_pipeline_as_base(pipeline_folder: Path, trained: dict[str, Path]) -> None:
    from cldm.generation import ControlNetPipeline, ControlUnit

    pipe = ControlNetPipeline.from_checkpoints(TINY, trained["diffusers"], base=pipeline_folder)
    image = torch.rand(64, 64, 3).mul(255).byte().numpy()
    result = pipe("a red circle", [ControlUnit(image)], width=64, height=64, steps=2, progress=False)
    assert result.images[0].size == (64, 64)
    assert len(result.settings["models"]["base"]["sha256"]) == 12


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_sd2_text_encoder_from_a_diffusers_pipeline_computes_what_transformers_does(layer: str) -> None:
    """diffusers stores SD2's OpenCLIP text tower as a transformers CLIPTextModel without its last block; ours gets
    it back under OpenCLIP's names, the dropped block as zeros (which adds nothing: "last" equals "penultimate")."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from cldm.formats import open_clip_from_transformers
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    torch.manual_seed(13)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="gelu")).eval()
    with torch.no_grad():
        for p in text.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}
    ours = FrozenOpenCLIPEmbedder(layer=layer, width=32, layers=3, heads=2, embed_dim=32)
    ours.load_state_dict(open_clip_from_transformers(state, dropped_last_block=True), strict=True)
    ids = ours.tokenize(["a house by the sea", ""])
    with torch.no_grad():
        assert rel_err(ours.encode_tokens(ids), text(input_ids=ids).last_hidden_state) < 1e-5
    complete = FrozenOpenCLIPEmbedder(layer="last", width=32, layers=2, heads=2, embed_dim=32)
    complete.load_state_dict(open_clip_from_transformers(state, dropped_last_block=False), strict=True)
    with torch.no_grad():
        assert rel_err(complete.encode_tokens(ids), text(input_ids=ids).last_hidden_state) < 1e-5


def test_what_diffusers_cannot_express_is_refused_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from cldm.formats import diffusers_config

    uneven = instantiate_from_config(control_config(TINY, num_res_blocks=[1, 2]))
    with pytest.raises(ValueError, match="number of ResBlocks that differs between levels"):
        diffusers_config(uneven)
    net = random_control_net(control_config(TINY), seed=14)
    src = save_full_checkpoint(tmp_path / "last.ckpt", net)
    assert tool_export_control.main([str(src), str(tmp_path / "x"), "--format", "diffusers", "--diff",
                                     "--config", TINY]) == 2
    assert "does not combine with --format diffusers" in capsys.readouterr().err
