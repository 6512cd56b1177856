"""Reading checkpoint files and loading them into a (deferred-built) model: every bad input gets one line."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, build_tiny, tiny_inputs

from cldm.checkpoint import CheckpointMismatchError
from cldm.model import CheckpointError, create_model, get_state_dict, load_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def _assert_one_line(err: BaseException, *needles: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def _small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3, generator=g),
        "control_model.zero_convs.0.0.bias": torch.randn(32, generator=g),
        "half": torch.randn(64, 64, generator=g).half(),
        "steps": torch.arange(10),
    }


def _touch(path: str) -> None:
    Path(path).touch()


class _Exploit:
    """Unpickling this would call `_touch(marker)`: weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _touch, (self.marker,)


# ----- cldm.model.load_state_dict: bad files ---------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path), "not found")
    assert isinstance(info.value, RuntimeError)


def test_truncated_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": _small_state(), "epoch": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path))


@pytest.mark.parametrize("content", [b"", b"model:\n  target: cldm.cldm.ControlLDM\n", b"\x00\x01garbage" * 100],
                         ids=["empty", "text", "binary"])
def test_not_a_checkpoint_named_ckpt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path))


@pytest.mark.parametrize("how", ["garbage", "truncated", "bad_header"])
def test_corrupt_safetensors(tmp_path: Path, how: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(_small_state(), str(path))
    data = path.read_bytes()
    if how == "garbage":
        data = b"this is not a safetensors file at all" * 10
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:8] + b"{not json" + data[17:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_pickle_with_a_disallowed_object_is_refused(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": _small_state(), "callback": _Exploit(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path))
    assert not marker.exists()


def test_refused_pickle_message_names_the_global_and_is_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _small_state(), "callback": _Exploit(tmp_path / "code_ran")}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert message.isprintable(), repr(message)
    assert "_touch" in message


def test_text_file_message_does_not_advise_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_text("model:\n  target: cldm.cldm.ControlLDM\n")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert "will likely succeed" not in str(info.value)


@pytest.mark.parametrize("payload", [{"epoch": 3, "global_step": 10}, {"state_dict": {"lr": 1e-5}}, {}],
                         ids=["no_tensors", "state_dict_without_tensors", "empty"])
def test_file_with_no_tensors(tmp_path: Path, payload: dict[str, Any]) -> None:
    path = tmp_path / "meta.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path), "no tensors")


def test_empty_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path), "no tensors")


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    _assert_one_line(info.value, str(path), "list")


# ----- cldm.model.load_state_dict: good files --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    state = _small_state()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


def test_state_dict_unwrapping(tmp_path: Path) -> None:
    state = _small_state()
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "global_step": 1234, "pytorch-lightning_version": "2.5.0"}, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert get_state_dict({"state_dict": state}) is state
    assert get_state_dict(state) is state


def test_non_tensor_entries_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "mixed.ckpt"
    torch.save({"weight": torch.ones(3), "note": "hello", "step": 5}, path)
    assert list(load_state_dict(path)) == ["weight"]


# ----- model.load_state_dict ---------------------------------------------------------------------------------------
def _assert_loaded(model: Any, state: dict[str, torch.Tensor]) -> None:
    got = torch.nn.Module.state_dict(model)
    assert got.keys() == state.keys()
    different = [k for k in state if not torch.equal(got[k], state[k])]
    assert different == []


def test_deferred_build_then_load_gives_exactly_the_checkpoint(tiny_state: dict[str, torch.Tensor]) -> None:
    model = build_tiny()
    parts = {name: model.get_submodule(name) for name in ("model.diffusion_model", "control_model",
                                                          "first_stage_model", "cond_stage_model")}
    model.load_state_dict(tiny_state)
    _assert_loaded(model, tiny_state)
    # a complete checkpoint leaves nothing to initialise: no part was rebuilt, and state_dict() changes nothing
    assert all(model.get_submodule(name) is part for name, part in parts.items())
    state = model.state_dict()
    assert state.keys() == tiny_state.keys()
    assert all(torch.equal(state[k], v) for k, v in tiny_state.items())


def test_ema_keys_are_ignored(tiny_state: dict[str, torch.Tensor]) -> None:
    model = build_tiny()
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0),
             "model_ema.diffusion_modelout2weight": torch.zeros(4, 32, 3, 3)}
    model.load_state_dict({**tiny_state, **extra}, strict=True)
    _assert_loaded(model, tiny_state)


def test_position_ids_key_is_accepted(tiny_state: dict[str, torch.Tensor]) -> None:
    model = build_tiny()
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert key not in tiny_state
    model.load_state_dict({**tiny_state, key: torch.arange(77).unsqueeze(0).float()}, strict=True)
    _assert_loaded(model, tiny_state)


def test_sd2_checkpoint_into_sd1_config(tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    widened = 0
    for key, value in tiny_state.items():
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            state[key] = torch.zeros(value.shape[0], 1024)
            widened += 1
    assert widened >= 8
    model = build_tiny()
    with pytest.raises(CheckpointMismatchError) as info:
        model.load_state_dict(state)
    _assert_one_line(info.value, "models/cldm_v21.yaml", "1024")


def test_plain_sd_checkpoint_without_control(tiny_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in tiny_state.items() if not k.startswith("control_model.")}
    model = build_tiny()
    with pytest.raises(CheckpointMismatchError) as info:
        model.load_state_dict(state)
    _assert_one_line(info.value, "no ControlNet weights", "tool_add_control.py")


def test_unrelated_mismatch_is_one_line(tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    state["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        build_tiny().load_state_dict(state)
    _assert_one_line(info.value, "something.else", "model.diffusion_model.out.2.weight")


def test_partial_load_initialises_the_control(tiny_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in tiny_state.items() if not k.startswith("control_model.")}
    model = build_tiny()
    model.load_state_dict(state, strict=False)
    got = torch.nn.Module.state_dict(model)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    control = model.control_model
    last_hint_conv = str(len(control.input_hint_block) - 1)
    zero_named = {name: p for name, p in control.named_parameters()
                  if name.startswith(("zero_convs.", "middle_block_out.", f"input_hint_block.{last_hint_conv}."))}
    assert len(zero_named) == 2 * (len(control.zero_convs) + 2)
    assert all(not p.any() for p in zero_named.values())
    assert all(torch.isfinite(v).all() for v in got.values())
    zero_init_inside = (".out_layers.3.", ".proj_out.")  # a ResBlock's last conv, a transformer's output
    others = [p for name, p in control.named_parameters()
              if name not in zero_named and p.dim() > 1 and not any(z in name for z in zero_init_inside)]
    assert others and all(p.std() > 0 for p in others)  # randomly initialised, not left empty or zero
    assert all(p.requires_grad for p in control.parameters())
    assert not any(p.requires_grad for p in model.model.diffusion_model.parameters())


def test_model_used_without_loading_materializes_itself() -> None:
    model = build_tiny()
    inp = tiny_inputs()
    with torch.no_grad():
        out = model.apply_model(inp["x"], inp["t"], {"c_concat": [inp["hint"]], "c_crossattn": [inp["ctx"]]})
    assert out.shape == inp["x"].shape
    assert torch.isfinite(out).all()
    state = torch.nn.Module.state_dict(model)
    assert all(torch.isfinite(v).all() for v in state.values())
    zero_convs = [p for name, p in model.control_model.named_parameters() if name.startswith("zero_convs.")]
    assert all(not p.any() for p in zero_convs)
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())


def test_state_dict_of_an_unloaded_model_is_initialised() -> None:
    state = build_tiny().state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())


# ----- create_model ---------------------------------------------------------------------------------------------
def test_create_model_missing_config(tmp_path: Path) -> None:
    path = tmp_path / "no_such_config.yaml"
    with pytest.raises(FileNotFoundError) as info:
        create_model(path)
    _assert_one_line(info.value, str(path))


def test_create_model_config_without_model_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  target: x\n")
    with pytest.raises(ValueError) as info:
        create_model(path)
    _assert_one_line(info.value, str(path), "model")


def test_released_configs_exist() -> None:
    for name in ("cldm_v15.yaml", "cldm_v21.yaml", "cldm_tiny.yaml"):
        assert (ROOT / "models" / name).is_file()


def test_a_part_captured_before_first_use_is_the_one_initialised() -> None:
    """Materialising fills the deferred tensors in place: a ControlNet taken before first use is the model's own."""
    from cldm.control import Control

    model = build_tiny()
    net = model.control_model
    control = Control(net, torch.rand(1, 3, 64, 64))
    model.materialize()
    assert model.control_model is net and control.net is net
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(p.std() > 0 for p in net.parameters() if p.numel() > 1)


def test_loading_onto_a_missing_device_blames_the_machine_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fine.ckpt"
    torch.save({"state_dict": _small_state()}, path)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device") as info:
        load_state_dict(path, location="cuda")
    assert "corrupt" not in str(info.value)


def test_a_load_that_fails_for_another_reason_is_not_called_a_mismatch(tiny_state: dict[str, torch.Tensor],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm.models.diffusion.ddpm import LatentDiffusion

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(LatentDiffusion, "load_state_dict", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        build_tiny().load_state_dict(tiny_state)
    assert not isinstance(info.value, CheckpointMismatchError)


def test_a_config_naming_a_missing_class_or_parameter_is_one_line(tmp_path: Path) -> None:
    text = (ROOT / "models" / "cldm_tiny.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("target: cldm.cldm.ControlNet", "target: cldm.cldm.ControlNett"))
    with pytest.raises(ValueError) as info:
        create_model(typo)
    _assert_one_line(info.value, str(typo), "ControlNett")
    extra = tmp_path / "extra.yaml"
    extra.write_text(text.replace("hint_channels: 3", "hint_channels: 3\n        hint_chanels: 3"))
    with pytest.raises(ValueError) as info:
        create_model(extra)
    _assert_one_line(info.value, str(extra), "hint_chanels")
