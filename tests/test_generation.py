"""Generation with ControlNet units on the tiny config: windows, weights, modes, Multi-ControlNet, CFG, CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from cldm.cldm import ControlNet
from cldm.control import Control, UNetWithControls
from cldm.generate import PNG_KEY, main, read_record
from cldm.generation import ControlNetPipeline, ControlUnit, GenerationResult
from cldm.model import CheckpointError, create_model
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "cldm_tiny.yaml"
N_SD = 13  # residuals of the SD ControlNet, for the formula tests with stub networks


def randomize_control(net: torch.nn.Module, seed: int) -> None:
    """A fresh ControlNet outputs zeros (zero convs); give its outputs random weights so control shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (net.zero_convs, net.middle_block_out, net.input_hint_block[-1]):
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def clone_all(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("generation")
    model = create_model(TINY)
    model.materialize()
    randomize_control(model.control_model, seed=1)
    with torch.no_grad():  # the UNet's output conv starts at zero too: a fresh UNet predicts no noise at all
        for p in model.model.diffusion_model.out[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    state = clone_all(model.state_dict())
    paths = {name: tmp / name for name in ("full.ckpt", "base.ckpt", "control.safetensors",
                                           "control_prefixed.safetensors", "control2.pth", "wrong.safetensors")}
    torch.save({"state_dict": state}, paths["full.ckpt"])
    torch.save({k: v for k, v in state.items() if not k.startswith("control_model.")}, paths["base.ckpt"])
    control = {k[len("control_model."):]: v for k, v in state.items() if k.startswith("control_model.")}
    save_file(control, str(paths["control.safetensors"]))
    save_file({"control_model." + k: v for k, v in control.items()}, str(paths["control_prefixed.safetensors"]))
    other: ControlNet = instantiate_from_config(model.part_configs["control_model"])
    randomize_control(other, seed=2)
    torch.save(clone_all(other.state_dict()), paths["control2.pth"])
    wrong = dict(control)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    wrong[key] = torch.zeros(wrong[key].shape[0], 1024)  # an SD2.x-wide cross-attention
    save_file(wrong, str(paths["wrong.safetensors"]))

    yy, xx = np.mgrid[0:80, 0:96]
    image = np.zeros((80, 96, 3), np.uint8)
    image[(yy - 40) ** 2 + (xx - 40) ** 2 < 400] = (255, 255, 255)
    image[10:30, 60:90] = (200, 60, 30)
    paths["image.png"] = tmp / "image.png"
    Image.fromarray(image).save(paths["image.png"])
    paths["broken.png"] = tmp / "broken.png"
    paths["broken.png"].write_bytes(b"not an image at all")
    return paths


@pytest.fixture(scope="module")
def pipe(files: dict[str, Path]) -> ControlNetPipeline:
    return ControlNetPipeline.from_checkpoints(TINY, files["full.ckpt"], extra_controls=[files["control2.pth"]])


def generate(pipe: ControlNetPipeline, units: Sequence[ControlUnit] = (), **kwargs: Any) -> GenerationResult:
    settings = {"prompt": "a red ball", "width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0, "progress": False}
    settings.update(kwargs)
    return pipe(units=units, **settings)


def pixels(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def inputs(pipe: ControlNetPipeline, files: dict[str, Path], batch: int = 2
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent, timesteps, contexts and hint for calling the denoisers directly."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn((batch, 4, 8, 8), generator=g)
    t = torch.full((batch,), 601, dtype=torch.long)
    cond = pipe.model.get_learned_conditioning(["a red ball"] * batch)
    uncond = pipe.model.get_learned_conditioning([""] * batch)
    hint = torch.rand((1, 3, 64, 64), generator=g)
    return x, t, cond, uncond, hint


class CountCalls:
    """Counts forward passes of a module through a removable hook (tests only)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x = args[0] if args else kwargs["x"]
        self.batches.append(x.shape[0])

    def __enter__(self) -> CountCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ----- guidance window and weight ---------------------------------------------------------------------------
def test_window_runs_the_control_net_only_inside_it(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    first = ControlUnit(files["image.png"], guidance_start=0.0, guidance_end=0.5, model=0)
    second = ControlUnit(files["image.png"], guidance_start=0.5, guidance_end=1.0, model=1, guess_mode=True)
    unet = pipe.model.model.diffusion_model
    with CountCalls(pipe.controls[0]) as c0, CountCalls(pipe.controls[1]) as c1, CountCalls(unet) as u:
        generate(pipe, [first, second], steps=20)
    assert c0.batches == [2] * 10  # balanced: both CFG halves
    assert c1.batches == [1] * 10  # guess mode: the conditional half only
    assert u.batches == [2] * 20  # one batched CFG forward per step


def test_weight_zero_and_empty_window_equal_no_control(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    plain = pixels(generate(pipe))
    zero = ControlUnit(files["image.png"], weight=0.0)
    empty = ControlUnit(files["image.png"], guidance_start=0.3, guidance_end=0.3)
    with CountCalls(pipe.controls[0]) as calls:
        assert np.array_equal(pixels(generate(pipe, [zero])), plain)
        assert np.array_equal(pixels(generate(pipe, [empty])), plain)
    assert calls.batches == []
    assert not np.array_equal(pixels(generate(pipe, [ControlUnit(files["image.png"])])), plain)

    x, t, cond, uncond, hint = inputs(pipe, files)
    unet = pipe.model.model.diffusion_model
    no_control = ClassifierFreeGuidance(UNetWithControls(unet), cond, uncond, 5.0)(x, t, 0.0)
    for control in (Control(pipe.controls[0], hint, weight=0.0),
                    Control(pipe.controls[0], hint, guidance_start=0.5, guidance_end=0.5)):
        guided = ClassifierFreeGuidance(UNetWithControls(unet, [control]), cond, uncond, 5.0)
        assert torch.equal(guided(x, t, 0.5), no_control)


def test_weight_multiplies_every_residual(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    x, t, cond, _, hint = inputs(pipe, files)
    yes = torch.ones(2, dtype=torch.bool)
    raw = pipe.controls[0](x=x, hint=hint.repeat(2, 1, 1, 1), timesteps=t, context=cond)
    scaled = Control(pipe.controls[0], hint, weight=0.7).residuals(x, t, cond, yes)
    assert len(scaled) == len(raw)
    for r, s in zip(raw, scaled):
        torch.testing.assert_close(s, 0.7 * r)


# ----- control modes against hand-computed residuals ----------------------------------------------------------
class StubNet:
    """Residual i is the constant `base * (i + 1)`; records the batch each call sees."""

    def __init__(self, base: float) -> None:
        self.base = base
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor) -> list[torch.Tensor]:
        assert hint.shape[0] == x.shape[0] == context.shape[0] == timesteps.shape[0]
        self.batches.append(x.shape[0])
        return [torch.full_like(x[:, :1], self.base * (i + 1)) for i in range(N_SD)]


class StubUNet:
    def __init__(self) -> None:
        self.control: list[torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 control: list[torch.Tensor] | None = None) -> torch.Tensor:
        self.control = control
        return x.clone()


def soft(weight: float) -> list[float]:
    return [weight * 0.825 ** (12 - i) for i in range(N_SD)]


def expected(base: float, weight: float, mode: str, guess: bool) -> tuple[list[float], list[float]]:
    """(uncond, cond) value of residual i, written out from the documented formulas."""
    scales = [weight] * N_SD if mode == "balanced" and not guess else soft(weight)
    cond = [base * (i + 1) * scales[i] for i in range(N_SD)]
    uncond = [0.0] * N_SD if guess or mode == "controlnet" else cond
    return uncond, cond


def run_stub(controls: list[Control], batch: int = 3) -> tuple[list[float], list[float]]:
    unet = StubUNet()
    x = torch.randn((batch, 4, 2, 2))
    cond, uncond = torch.randn((batch, 5, 8)), torch.randn((batch, 5, 8))
    ClassifierFreeGuidance(UNetWithControls(unet, controls), cond, uncond, 7.5)(x, torch.full((batch,), 10), 0.1)
    assert unet.control is not None
    halves = [r.chunk(2) for r in unet.control]
    for r_uncond, r_cond in halves:  # each half is constant over its rows
        assert r_uncond.unique().numel() == 1 and r_cond.unique().numel() == 1
    return [float(u.flatten()[0]) for u, _ in halves], [float(c.flatten()[0]) for _, c in halves]


@pytest.mark.parametrize(("mode", "guess"), [("balanced", False), ("prompt", False), ("controlnet", False),
                                             ("balanced", True), ("prompt", True)])
def test_control_modes_match_the_formulas(mode: str, guess: bool) -> None:
    net = StubNet(base=1.0)
    uncond, cond = run_stub([Control(net, torch.zeros(1, 3, 16, 16), weight=0.6, control_mode=mode,
                                     guess_mode=guess)])
    want_uncond, want_cond = expected(1.0, 0.6, mode, guess)
    assert uncond == pytest.approx(want_uncond, rel=1e-6, abs=1e-7)
    assert cond == pytest.approx(want_cond, rel=1e-6)
    conditional_only = guess or mode == "controlnet"
    assert net.batches == [3 if conditional_only else 6]  # conditional-only runs on the prompt half alone


def test_two_units_sum_their_residuals_by_hand() -> None:
    a = Control(StubNet(1.0), torch.zeros(1, 3, 16, 16), weight=0.5)
    b = Control(StubNet(10.0), torch.zeros(1, 3, 16, 16), weight=2.0, control_mode="controlnet")
    uncond, cond = run_stub([a, b])
    a_uncond, a_cond = expected(1.0, 0.5, "balanced", False)
    b_uncond, b_cond = expected(10.0, 2.0, "controlnet", False)
    assert uncond == pytest.approx([p + q for p, q in zip(a_uncond, b_uncond)], rel=1e-6)
    assert cond == pytest.approx([p + q for p, q in zip(a_cond, b_cond)], rel=1e-6)


def test_two_units_equal_unet_with_summed_residuals(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    x, t, cond, _, hint = inputs(pipe, files)
    hint2 = hint.flip(-1)
    unet = pipe.model.model.diffusion_model
    units = [Control(pipe.controls[0], hint, weight=0.8), Control(pipe.controls[1], hint2, weight=1.3)]
    yes = torch.ones(2, dtype=torch.bool)
    got = UNetWithControls(unet, units)(x, t, cond, yes, 0.0)
    r0 = [0.8 * r for r in pipe.controls[0](x=x, hint=hint.repeat(2, 1, 1, 1), timesteps=t, context=cond)]
    r1 = [1.3 * r for r in pipe.controls[1](x=x, hint=hint2.repeat(2, 1, 1, 1), timesteps=t, context=cond)]
    want = unet(x, timesteps=t, context=cond, control=[p + q for p, q in zip(r0, r1)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unet(x, timesteps=t, context=cond, control=None))


@pytest.mark.parametrize(("mode", "guess"), [("balanced", False), ("controlnet", False), ("prompt", True)])
def test_batched_cfg_equals_two_passes(pipe: ControlNetPipeline, files: dict[str, Path], mode: str,
                                       guess: bool) -> None:
    x, t, cond, uncond, hint = inputs(pipe, files)
    model = UNetWithControls(pipe.model.model.diffusion_model,
                           [Control(pipe.controls[0], hint, 1.2, control_mode=mode, guess_mode=guess)])
    batched = ClassifierFreeGuidance(model, cond, uncond, 6.0, batched=True)(x, t, 0.2)
    separate = ClassifierFreeGuidance(model, cond, uncond, 6.0, batched=False)(x, t, 0.2)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)


# ----- pipeline ---------------------------------------------------------------------------------------------
def test_seeded_generation_samplers_and_low_vram(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    unit = ControlUnit(files["image.png"], preprocessor="canny", resize_mode="crop_and_resize")
    ddim = generate(pipe, [unit], seed=3, batch_size=2)
    assert len(ddim.images) == 2 and ddim.images[0].size == (64, 64)
    assert ddim.control_maps[0].size == (64, 64)
    assert np.array_equal(pixels(generate(pipe, [unit], seed=3, batch_size=2)), pixels(ddim))
    assert np.array_equal(pixels(generate(pipe, [unit], seed=3, batch_size=2, low_vram=True)), pixels(ddim))
    assert not np.array_equal(pixels(generate(pipe, [unit], seed=4, batch_size=2)), pixels(ddim))
    dpm = generate(pipe, [unit], seed=3, sampler="dpmpp_2m")
    assert np.array_equal(pixels(generate(pipe, [unit], seed=3, sampler="dpmpp_2m")), pixels(dpm))
    assert not np.array_equal(pixels(dpm), pixels(ddim)[:1])
    eta = generate(pipe, [unit], seed=3, eta=0.5)
    assert np.array_equal(pixels(generate(pipe, [unit], seed=3, eta=0.5)), pixels(eta))
    settings = ddim.settings
    assert settings["units"][0]["preprocessor"] == "canny" and settings["seed"] == 3
    assert len(settings["units"][0]["image_sha256"]) == 12


def test_half_precision_networks_give_nearly_the_same_image(pipe: ControlNetPipeline, files: dict[str, Path]
                                                            ) -> None:
    """`dtype` holds every network in half precision (bf16 here; fp16 on a GPU); the sampler stays float32."""
    half = ControlNetPipeline.from_checkpoints(TINY, files["full.ckpt"], dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.model.alphas_cumprod.dtype == torch.float32
    unit = ControlUnit(files["image.png"], preprocessor="canny")
    full_pixels = pixels(generate(pipe, [unit], seed=3)).astype(float)
    half_pixels = pixels(generate(half, [unit], seed=3)).astype(float)
    other_seed = pixels(generate(pipe, [unit], seed=4)).astype(float)
    # measured: 0.3 grey levels from full precision, against 43 between two seeds
    assert np.abs(half_pixels - full_pixels).mean() < 0.05 * np.abs(other_seed - full_pixels).mean()


@pytest.mark.parametrize("control_file", ["control.safetensors", "control_prefixed.safetensors"])
def test_base_plus_control_only_file_equals_full_checkpoint(pipe: ControlNetPipeline, files: dict[str, Path],
                                                            control_file: str) -> None:
    split = ControlNetPipeline.from_checkpoints(TINY, files[control_file], base=files["base.ckpt"])
    unit = ControlUnit(files["image.png"])
    assert np.array_equal(pixels(generate(split, [unit])), pixels(generate(pipe, [unit])))


def test_checkpoint_errors_are_one_line(files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="SD2.x") as err:
        ControlNetPipeline.from_checkpoints(TINY, files["wrong.safetensors"], base=files["base.ckpt"])
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="--base"):
        ControlNetPipeline.from_checkpoints(TINY, files["control.safetensors"])
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        ControlNetPipeline.from_checkpoints(TINY, files["base.ckpt"], base=files["base.ckpt"])


def test_bad_requests(pipe: ControlNetPipeline, files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(pipe, width=60)
    with pytest.raises(ValueError, match="multiples of 16"):  # the tiny UNet halves the latent once
        generate(pipe, width=72)
    with pytest.raises(ValueError, match="unknown preprocessor 'sketch'; known: none, canny"):
        ControlUnit(files["image.png"], preprocessor="sketch")
    with pytest.raises(ValueError, match="guidance window"):
        ControlUnit(files["image.png"], guidance_start=0.8, guidance_end=0.2)
    with pytest.raises(ValueError, match="not loaded"):
        generate(pipe, [ControlUnit(files["image.png"], model=5)])
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(pipe, sampler="euler")


# ----- command line -----------------------------------------------------------------------------------------
def cli_base(files: dict[str, Path], out: Path) -> list[str]:
    return ["--config", str(TINY), "--ckpt", str(files["full.ckpt"]), "--prompt", "a red ball", "--width", "64",
            "--height", "64", "--steps", "4", "--device", "cpu", "--out", str(out)]


def test_png_record_reproduces_bit_for_bit(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    units = [{"image": str(files["image.png"]), "preprocessor": "canny", "threshold_a": 50, "threshold_b": 150,
              "weight": 0.8, "guidance_end": 0.75, "pixel_perfect": True},
             {"image": "image.png", "model": "control2.pth", "control_mode": "controlnet", "invert": True,
              "resize_mode": "resize_and_fill"}]
    units_file = files["image.png"].parent / "units.yaml"
    units_file.write_text(yaml.safe_dump(units))
    first = tmp_path / "first.png"
    argv = cli_base(files, first) + ["--units", str(units_file), "--seed", "7", "--cfg_scale", "4",
                                     "--negative_prompt", "blurry", "--save_control"]
    assert main(argv) == 0
    record = read_record(first)
    assert record["seed"] == 7 and record["negative_prompt"] == "blurry" and record["cfg_scale"] == 4.0
    assert record["ckpt"]["path"] == str(files["full.ckpt"]) and len(record["ckpt"]["sha256"]) == 12
    assert [u["model"] for u in record["units"]] == [0, str(files["control2.pth"])]
    assert record["units"][0]["threshold_a"] == 50 and len(record["units"][1]["image_sha256"]) == 12
    assert (tmp_path / "first-control1.png").is_file()

    again = tmp_path / "again.png"
    assert main(["--from-png", str(first), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert Image.open(again).text[PNG_KEY] == Image.open(first).text[PNG_KEY]

    other = tmp_path / "other.png"
    assert main(["--from-png", str(first), "--out", str(other), "--seed", "8"]) == 0
    assert read_record(other)["seed"] == 8
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(first)))
    capsys.readouterr()


@pytest.mark.parametrize(("extra", "message"), [
    (["--image", "{image}", "--preprocessor", "sketch"], "unknown preprocessor 'sketch'; known: none, canny"),
    (["--image", "{broken}"], "not a readable image"),
    (["--image", "{image}", "--width", "60"], "multiples of 8"),
    (["--image", "{image}", "--ckpt", "{missing}"], "checkpoint file not found"),
    (["--image", "{image}", "--ckpt", "{wrong}", "--base", "{base}"], "SD2.x"),
    (["--image", "{image}", "--preprocessor", "openpose", "--annotator_dir", "{empty}"],
     "missing annotator weights 'body_pose_model.pth'"),
])
def test_cli_bad_inputs_give_one_line(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      extra: list[str], message: str) -> None:
    names = {"image": files["image.png"], "broken": files["broken.png"], "missing": tmp_path / "missing.ckpt",
             "wrong": files["wrong.safetensors"], "base": files["base.ckpt"], "empty": tmp_path}
    argv = cli_base(files, tmp_path / "out.png") + [arg.format(**names) for arg in extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_cli_missing_image_in_a_subprocess(files: dict[str, Path], tmp_path: Path) -> None:
    argv = cli_base(files, tmp_path / "out.png") + ["--image", str(tmp_path / "nowhere.png")]
    proc = subprocess.run([sys.executable, "-m", "cldm.generate", *argv], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nowhere.png'}: image file not found"
