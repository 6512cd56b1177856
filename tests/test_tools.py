"""tool_add_control / tool_transfer_control on tiny checkpoints: exact weights, the formula, every refusal."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from launcher import run_command
from safetensors.torch import load_file

import tool_add_control
import tool_transfer_control
from cldm.checkpoint import key_group, save_state_dict, sha256_short
from cldm.model import CROSS_ATTN_KEY, create_model, load_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = "models/cldm_tiny.yaml"
UNET, CONTROL, VAE = "model.diffusion_model.", "control_model.", "first_stage_model."
NEW_GROUPS = {"control_model.input_hint_block.*", "control_model.zero_convs.*", "control_model.middle_block_out.*"}
OFFSET_KEY = "input_blocks.1.0.in_layers.2.weight"  # in the UNet and the ControlNet: offset by transfer
ZERO_KEY = "zero_convs.0.0.weight"  # ControlNet only: copied as is
SD = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny_sd() -> SD:
    """A tiny ControlLDM's SD weights (no control_model.*), randomly initialised."""
    torch.manual_seed(0)
    model = create_model(ROOT / TINY)
    model.materialize()
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(CONTROL)}


@pytest.fixture(scope="module")
def sd_file(tiny_sd: SD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SD checkpoint as a training run leaves it: EMA weights and optimizer state beside the model's."""
    path = tmp_path_factory.mktemp("sd") / "sd.ckpt"
    junk = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelout0weight": torch.ones(2)}
    torch.save({"state_dict": {**tiny_sd, **junk}, "optimizer_states": [{"lr": 1e-5}], "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def controlnet(sd_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cn") / "control_ini.ckpt"
    return out, tool_add_control.add_control(sd_file, out, ROOT / TINY)


def _save(tmp_path: Path, name: str, sd: SD) -> Path:
    return save_state_dict(sd, tmp_path / name)


def _cli_error(main: object, argv: list[str]) -> str:
    """Run a tool's main expecting a refusal (exit status 2); return its one-line message."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)  # type: ignore[operator]
    message = stderr.getvalue().strip()
    assert status == 2 and message.startswith("error: ") and "\n" not in message, (status, message)
    return message


# ----- tool_add_control ------------------------------------------------------------------------------------
def test_add_control_copies_unet_encoder_and_zero_inits(controlnet: tuple[Path, dict], tiny_sd: SD) -> None:
    path, report = controlnet
    out = load_state_dict(path)
    copied = [k for k in out if k.startswith(CONTROL) and UNET + k[len(CONTROL):] in tiny_sd]
    assert copied and report["copied_to_control"] == len(copied)
    for key in copied:
        assert torch.equal(out[key], tiny_sd[UNET + key[len(CONTROL):]]), key
    for key, value in tiny_sd.items():
        assert torch.equal(out[key], value), key
    new = [k for k in out if k.startswith(CONTROL) and k not in copied]
    assert {key_group(k) for k in new} == NEW_GROUPS == set(report["new_groups"])
    for key in new:
        if key.startswith(("control_model.zero_convs.", "control_model.middle_block_out.")):
            assert not out[key].any(), key
    hint_weights = [k for k in new if "input_hint_block" in k and k.endswith("weight")]
    assert out[hint_weights[0]].abs().sum() > 0 and not out[hint_weights[-1]].any()  # last hint conv is zero
    assert report["ignored"] == 2 and report["ignored_groups"] == {"model_ema.*": 2}
    assert not any(k.startswith("model_ema.") for k in out)
    create_model(ROOT / TINY).load_state_dict(out, strict=True)


def test_add_control_safetensors_output(sd_file: Path, tiny_sd: SD, tmp_path: Path) -> None:
    out = tmp_path / "control.safetensors"
    tool_add_control.add_control(sd_file, out, TINY)
    weights = load_file(out)
    assert torch.equal(weights[CONTROL + OFFSET_KEY], tiny_sd[UNET + OFFSET_KEY])
    assert not weights[CONTROL + ZERO_KEY].any()
    assert [p.name for p in tmp_path.iterdir()] == ["control.safetensors"]  # no temporary file left behind


def test_add_control_is_reproducible_from_its_seed(sd_file: Path, tmp_path: Path) -> None:
    """Same input and seed, same checkpoint (so a demo run repeats exactly); another seed, another hint block."""
    torch.manual_seed(123)
    caller_rng = torch.get_rng_state()
    runs = {name: tool_add_control.add_control(sd_file, tmp_path / f"{name}.ckpt", TINY, seed=seed)["output"]
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    assert torch.equal(torch.get_rng_state(), caller_rng)
    a, b, c = (load_state_dict(runs[name]) for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = {k for k in a if not torch.equal(a[k], c[k])}
    assert differ and all("input_hint_block" in k for k in differ)


def test_add_control_refuses_existing_output(sd_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"precious")
    message = _cli_error(tool_add_control.main, [str(sd_file), str(out), "--config", TINY])
    assert "already exists" in message and out.read_bytes() == b"precious"


def test_add_control_refuses_a_controlnet(controlnet: tuple[Path, dict], tmp_path: Path) -> None:
    full = load_state_dict(controlnet[0])
    bare = _save(tmp_path, "control_only.pth", {k[len(CONTROL):]: v for k, v in full.items() if k.startswith(CONTROL)})
    for path in (controlnet[0], bare):
        message = _cli_error(tool_add_control.main, [str(path), str(tmp_path / "o.ckpt"), "--config", TINY])
        assert "already a ControlNet checkpoint" in message


def test_add_control_refuses_non_sd_and_broken_files(sd_file: Path, tmp_path: Path) -> None:
    not_sd = _save(tmp_path, "vae.ckpt", {"encoder.conv_in.weight": torch.zeros(2, 3)})
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(sd_file.read_bytes()[:4096])
    cases = {not_sd: "not a Stable Diffusion checkpoint", garbage: "garbage.ckpt",
             truncated: "truncated.ckpt", tmp_path / "missing.ckpt": "not found"}
    for path, expected in cases.items():
        message = _cli_error(tool_add_control.main, [str(path), str(tmp_path / "o.ckpt"), "--config", TINY])
        assert expected in message, message
    assert not (tmp_path / "o.ckpt").exists()


@pytest.mark.parametrize(("width", "advice"), [(1024, "use models/cldm_v21.yaml"), (48, "context_dim 48")])
def test_add_control_refuses_wrong_family(tiny_sd: SD, tmp_path: Path, width: int, advice: str) -> None:
    key = UNET + CROSS_ATTN_KEY
    sd = {**tiny_sd, key: torch.zeros(tiny_sd[key].shape[0], width)}
    path = _save(tmp_path, "sd2.safetensors", sd)
    message = _cli_error(tool_add_control.main, [str(path), str(tmp_path / "o.ckpt"), "--config", TINY])
    assert f"text width {width}" in message and advice in message


def test_add_control_needs_config_for_unknown_width_and_a_vae(tiny_sd: SD, tmp_path: Path) -> None:
    path = _save(tmp_path, "sd.ckpt", tiny_sd)
    assert "pass --config" in _cli_error(tool_add_control.main, [str(path), str(tmp_path / "o.ckpt")])
    no_vae = _save(tmp_path, "no_vae.ckpt", {k: v for k, v in tiny_sd.items() if not k.startswith(VAE)})
    message = _cli_error(tool_add_control.main, [str(no_vae), str(tmp_path / "o.ckpt"), "--config", TINY])
    assert "lacks" in message and "first_stage_model." in message


@pytest.mark.slow
def test_add_control_command_line(sd_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "control.pth"
    command = ["tool_add_control.py", str(sd_file), str(out), "--config", TINY]
    done = run_command(command, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "control_model.zero_convs.*" in done.stdout and out.is_file()


# ----- tool_transfer_control --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transfer_inputs(tiny_sd: SD, controlnet: tuple[Path, dict]) -> tuple[SD, SD, SD]:
    """BASE (with constants on OFFSET_KEY), a trained CONTROL (full ControlLDM), TARGET (a fine-tune of BASE)."""
    generator = torch.Generator().manual_seed(1)
    base = dict(tiny_sd)
    base[UNET + OFFSET_KEY] = torch.full_like(base[UNET + OFFSET_KEY], 1.0)
    target = {k: v + 0.1 * torch.randn(v.shape, generator=generator) if k.startswith(UNET) or k.startswith(VAE)
              else v for k, v in base.items()}
    target[UNET + OFFSET_KEY] = torch.full_like(base[UNET + OFFSET_KEY], 3.5)
    control = dict(load_state_dict(controlnet[0]))
    control.update({k: base[k] for k in base})  # trained with the SD locked: its UNet is BASE's
    control.update({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in control.items()
                    if k.startswith(CONTROL)})
    control[CONTROL + OFFSET_KEY] = torch.full_like(base[UNET + OFFSET_KEY], 0.25)
    control[CONTROL + ZERO_KEY] = torch.full_like(control[CONTROL + ZERO_KEY], 0.5)
    return base, control, target


def _control_layout(control: SD, layout: str) -> SD:
    if layout == "full":
        return control
    only = {k: v for k, v in control.items() if k.startswith(CONTROL)}
    return only if layout == "prefixed" else {k[len(CONTROL):]: v for k, v in only.items()}


@pytest.mark.parametrize("layout", ["full", "prefixed", "bare"])
def test_transfer_formula(transfer_inputs: tuple[SD, SD, SD], tmp_path: Path, layout: str) -> None:
    base, control, target = transfer_inputs
    paths = [_save(tmp_path, "base.ckpt", base),
             _save(tmp_path, "control.safetensors", _control_layout(control, layout)),
             _save(tmp_path, "target.ckpt", target)]
    assert tool_transfer_control.main([f"--{role}={p}" for role, p in zip(("base", "control", "target"), paths)]
                                      + [f"--out={tmp_path / 'out.safetensors'}", f"--config={TINY}"]) == 0
    report = tool_transfer_control.transfer_control(*paths, tmp_path / "again.safetensors", TINY)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out[CONTROL + OFFSET_KEY], torch.full_like(out[CONTROL + OFFSET_KEY], 0.25 + 3.5 - 1.0))
    assert torch.equal(out[CONTROL + ZERO_KEY], control[CONTROL + ZERO_KEY])
    for key in out:
        unet_key = UNET + key[len(CONTROL):]
        if key.startswith(CONTROL) and unet_key in base:
            torch.testing.assert_close(out[key], control[key] + target[unet_key] - base[unet_key])
        elif key.startswith(CONTROL):
            assert torch.equal(out[key], control[key]), key
        else:
            assert torch.equal(out[key], target[key]), key  # UNet, VAE, text encoder and schedule: TARGET's
    assert set(report["copied_groups"]) == NEW_GROUPS and report["control_unet_differs"] == 0
    if layout == "full":
        create_model(ROOT / TINY).load_state_dict(out, strict=True)


def test_transfer_onto_base_keeps_control_exactly(transfer_inputs: tuple[SD, SD, SD], tmp_path: Path) -> None:
    base, control, _ = transfer_inputs
    control = {**control, UNET + OFFSET_KEY: control[UNET + OFFSET_KEY] + 1}  # e.g. trained with SD unlocked
    paths = [_save(tmp_path, "base.ckpt", base), _save(tmp_path, "control.ckpt", control)]
    report = tool_transfer_control.transfer_control(paths[0], paths[1], paths[0], tmp_path / "out.ckpt", TINY)
    out = load_state_dict(tmp_path / "out.ckpt")
    assert all(torch.equal(out[k], control[k]) for k in out if k.startswith(CONTROL))
    assert torch.equal(out[UNET + OFFSET_KEY], base[UNET + OFFSET_KEY])
    assert report["control_unet_differs"] == 1


def test_transfer_refusals(transfer_inputs: tuple[SD, SD, SD], tmp_path: Path) -> None:
    base, control, target = transfer_inputs
    wide = {**target, UNET + CROSS_ATTN_KEY: torch.zeros(target[UNET + CROSS_ATTN_KEY].shape[0], 1024)}
    files = {name: _save(tmp_path, f"{name}.ckpt", sd) for name, sd in {
        "base": base, "control": control, "target": target, "wide": wide,
        "short": {k: v for k, v in target.items() if k != UNET + OFFSET_KEY},
        "bare": _control_layout(control, "bare"),
        "wide_control": {**_control_layout(control, "bare"),
                         CROSS_ATTN_KEY: torch.zeros(control[CONTROL + CROSS_ATTN_KEY].shape[0], 1024)},
    }.items()}
    (tmp_path / "corrupt.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    (tmp_path / "exists.ckpt").write_bytes(b"precious")
    cases = [
        ({"out": "exists.ckpt"}, "already exists"),
        ({"base": "bare.ckpt"}, "BASE has no model.diffusion_model"),
        ({"target": "wide.ckpt"}, "same family"),
        ({"target": "short.ckpt"}, "differs in layout"),
        ({"control": "base.ckpt"}, "plain Stable Diffusion checkpoint"),
        ({"control": "wide_control.ckpt"}, "give the BASE it was trained from"),
        ({"control": "corrupt.ckpt"}, "corrupt.ckpt"),
        ({"target": "missing.ckpt"}, "not found"),
    ]
    for change, expected in cases:
        roles = {"base": files["base"].name, "control": files["control"].name, "target": files["target"].name,
                 "out": "out.ckpt", **change}
        argv = [f"--{role}={tmp_path / name}" for role, name in roles.items()] + [f"--config={TINY}"]
        assert expected in _cli_error(tool_transfer_control.main, argv), change
    assert not (tmp_path / "out.ckpt").exists() and (tmp_path / "exists.ckpt").read_bytes() == b"precious"


# ----- cldm.checkpoint -------------------------------------------------------------------------------------
def test_save_state_dict_is_atomic_and_never_overwrites(tmp_path: Path) -> None:
    weights = torch.arange(6.0)
    sd = {"a": weights, "b": weights[:3], "c": weights.view(2, 3).t()}  # shared and non-contiguous
    path = save_state_dict(sd, tmp_path / "w.safetensors")
    assert all(torch.equal(load_file(path)[k], v) for k, v in sd.items())
    with pytest.raises(FileExistsError):
        save_state_dict({"a": torch.ones(1)}, path)
    save_state_dict({"a": torch.ones(1)}, path, overwrite=True)
    assert torch.equal(load_state_dict(path)["a"], torch.ones(1))
    with pytest.raises(ValueError, match="extension"):
        save_state_dict(sd, tmp_path / "w.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    (tmp_path / "abc").write_bytes(b"abc")  # sha256("abc") is the FIPS 180-2 test vector
    assert sha256_short(tmp_path / "abc") == "ba7816bf8f"
