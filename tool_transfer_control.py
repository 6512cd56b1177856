"""Move a ControlNet trained on one Stable Diffusion model (BASE) onto a fine-tune of it (TARGET).

A ControlNet's encoder copy learned `control = base + delta`; on a community model the same delta should sit on
top of that model's encoder. So for every ControlNet weight `control_model.X`:

    out[control_model.X] = control[X] + (target[model.diffusion_model.X] - base[model.diffusion_model.X])

where the UNet has `X` (time embedding, input blocks, middle block), and `out[control_model.X] = control[X]`
where it has not (hint block, zero convs, `middle_block_out`). The UNet, VAE, text encoder and schedule of
the output are TARGET's, so OUT is a full ControlLDM checkpoint for TARGET.

The original `tool_transfer_control.py` applied `control + target - base` to every key of the control
checkpoint except the VAE and text encoder, UNet keys included; with the SD locked in training the control
checkpoint's UNet is BASE's, which makes those keys TARGET's. Taking TARGET's UNet directly gives that
result exactly in floating point and does not leak a difference between BASE and the model the ControlNet
was really trained from (say an EMA-only BASE) into the UNet; a control checkpoint whose UNet differs from
BASE is reported (`control_unet_differs`), since its decoder changes (training with `sd_locked=False`) are
not carried over. The sum is computed in float32 and stored in the control weight's dtype.

CONTROL may be a full ControlLDM checkpoint or a control-only file (ControlNet 1.1 style), with or without the
`control_model.` prefix.

    python tool_transfer_control.py --base v1-5-pruned.ckpt --control control_sd15_canny.pth \\
        --target anything-v3.safetensors --out control_any3_canny.safetensors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cldm.checkpoint import (
    CONTROL_PREFIX,
    UNET_PREFIX,
    CheckpointError,
    CheckpointMismatchError,
    check_control_fits,
    check_fits,
    check_output_path,
    config_for_unet,
    context_dim_of,
    control_weights,
    describe_family,
    has_unet,
    key_groups,
    load_state_dict,
    save_state_dict,
    unet_weights,
)
from cldm.model import create_model
from ldm.errors import DEBUG_HELP, command_line
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS


def transfer_control(base: str | Path, control: str | Path, target: str | Path, out: str | Path,
                     config_path: str | Path | None = None) -> dict[str, Any]:
    """Write OUT: TARGET with CONTROL's ControlNet moved from BASE onto TARGET by the formula above.

    Returns a report: the config, how many ControlNet weights were offset and copied as is, how many
    weights came from TARGET, and how many UNet tensors of a full CONTROL checkpoint differ from BASE's.
    """
    out_path = check_output_path(out)
    base_sd = _load_sd(base, "BASE")
    target_sd = _load_sd(target, "TARGET")
    _check_same_family(base_sd, target_sd, base, target)
    control_sd = load_state_dict(control)
    ctrl = control_weights(control_sd, f"{control}: CONTROL", unet_weights(base_sd))
    _check_control_family(ctrl, base_sd, control, base)
    config = str(config_path) if config_path is not None else config_for_unet(base_sd, UNET_PREFIX, str(base))
    expected = dict(nn.Module.state_dict(create_model(config)))  # names, shapes and the computed schedule
    sd_keys = [k for k in expected if not k.startswith(CONTROL_PREFIX) and k not in SCHEDULE_BUFFERS]
    check_fits(base_sd, expected, str(base), config, [k for k in sd_keys if k.startswith(UNET_PREFIX)])
    check_fits(target_sd, expected, str(target), config, sd_keys)
    expected_control = {k[len(CONTROL_PREFIX):]: v for k, v in expected.items() if k.startswith(CONTROL_PREFIX)}
    check_control_fits(ctrl, expected_control, f"{control}: CONTROL", config)
    differs = _unet_differences(control_sd, base_sd)
    schedule = {k: v for k, v in control_sd.items() if k in SCHEDULE_BUFFERS}
    del control_sd  # only its ControlNet weights (`ctrl`) and schedule are needed: free the rest now
    result, offset = _combine(expected, ctrl, base_sd, target_sd, schedule)
    ignored = [k for k in target_sd if k not in expected]
    del base_sd, ctrl
    save_state_dict(result, out_path)
    copied = [k for k in expected if k.startswith(CONTROL_PREFIX) and k not in offset]
    return {
        "base": str(base), "control": str(control), "target": str(target), "output": str(out_path),
        "config": config, "offset": len(offset), "copied": len(copied), "copied_groups": key_groups(copied),
        "from_target": sum(k in target_sd for k in expected), "ignored_from_target": len(ignored),
        "control_unet_differs": differs,
    }


def _load_sd(path: str | Path, role: str) -> dict[str, torch.Tensor]:
    """A Stable Diffusion checkpoint's weights; BASE's UNet only, as nothing else of it is used."""
    sd = load_state_dict(path)
    if role == "BASE":
        sd = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if not has_unet(sd):
        raise CheckpointError(f"{path}: {role} has no model.diffusion_model.* weights: not a Stable Diffusion "
                              "checkpoint in the original layout")
    return sd


def _unet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: sd[k].shape for k in sd if k.startswith(UNET_PREFIX)}


def _check_same_family(base_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor],
                       base: str | Path, target: str | Path) -> None:
    """The offset `target - base` only means something between two versions of one architecture."""
    have, want = context_dim_of(target_sd, UNET_PREFIX), context_dim_of(base_sd, UNET_PREFIX)
    if have != want:
        raise CheckpointMismatchError(f"{target}: TARGET is {describe_family(have)} but BASE {base} is "
                                      f"{describe_family(want)}: they must be the same family")
    base_unet, target_unet = _unet(base_sd), _unet(target_sd)
    if base_unet != target_unet:
        only = sorted(base_unet.keys() ^ target_unet.keys())
        wrong = [f"{k} {list(base_unet[k])} vs {list(target_unet[k])}" for k in base_unet
                 if k in target_unet and base_unet[k] != target_unet[k]]
        example = only[0] + " in only one" if only else wrong[0]
        raise CheckpointMismatchError(f"{target}: TARGET's UNet differs in layout from BASE {base}'s "
                                      f"(e.g. {example}): they must be the same family")


def _check_control_family(ctrl: Mapping[str, torch.Tensor], base_sd: Mapping[str, torch.Tensor],
                          control: str | Path, base: str | Path) -> None:
    have, want = context_dim_of(ctrl, ""), context_dim_of(base_sd, UNET_PREFIX)
    if have is not None and want is not None and have != want:
        raise CheckpointMismatchError(f"{control}: CONTROL is a ControlNet for {describe_family(have)} "
                                      f"but BASE {base} is {describe_family(want)}: give the BASE it "
                                      "was trained from")


def _unet_differences(control_sd: Mapping[str, torch.Tensor], base_sd: Mapping[str, torch.Tensor]) -> int:
    """How many UNet tensors a full CONTROL checkpoint holds that are not BASE's (0 for a control-only file)."""
    shared = [k for k in control_sd if k.startswith(UNET_PREFIX) and k in base_sd]
    return sum(not torch.equal(control_sd[k], base_sd[k].to(control_sd[k].dtype)) for k in shared)


def _combine(expected: Mapping[str, torch.Tensor], ctrl: Mapping[str, torch.Tensor],
             base_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor],
             control_schedule: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OUT's weights in the config's key order, and the ControlNet keys that were offset."""
    result: dict[str, torch.Tensor] = {}
    offset: list[str] = []
    for key, default in expected.items():
        if key.startswith(CONTROL_PREFIX):
            name = key[len(CONTROL_PREFIX):]
            unet_key = UNET_PREFIX + name
            if unet_key in expected and expected[unet_key].shape == default.shape:
                result[key] = _offset(ctrl[name], base_sd[unet_key], target_sd[unet_key])
                offset.append(key)
            else:
                result[key] = ctrl[name]
        elif key in target_sd:
            result[key] = target_sd[key]
        else:  # a schedule buffer TARGET lacks: CONTROL's when it has one, else the config's
            result[key] = control_schedule.get(key, default)
    return result, offset


def _offset(control: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """control + (target - base), in float32, in the control weight's dtype; exactly `control` if target == base."""
    return (control.float() + (target.float() - base.float())).to(control.dtype)


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(epilog=DEBUG_HELP, description=(
        "Move a ControlNet trained on BASE onto TARGET, a fine-tune of "
        "BASE: control + (target - base) on the ControlNet's UNet copy."))
    parser.add_argument("--base", required=True, help="the SD checkpoint the ControlNet was trained from")
    parser.add_argument("--control", required=True,
                        help="the trained ControlNet: a full ControlLDM checkpoint or a control-only file")
    parser.add_argument("--target", required=True, help="the SD checkpoint (fine-tune of BASE) to control")
    parser.add_argument("--out", required=True, help="checkpoint to write (.ckpt, .pth or .safetensors); "
                                                     "must not exist")
    parser.add_argument("--config", default=None,
                        help="model config (default: models/cldm_v15.yaml or models/cldm_v21.yaml, from BASE)")
    args = parser.parse_args(argv)
    _print_report(transfer_control(args.base, args.control, args.target, args.out, args.config))
    return 0


def _print_report(report: Mapping[str, Any]) -> None:
    print(f"config: {report['config']}")
    print(f"ControlNet: {report['offset']} weights offset by TARGET - BASE, {report['copied']} copied as is ("
          + ", ".join(report["copied_groups"]) + ")")
    print(f"from TARGET: {report['from_target']} weights (UNet, VAE, text encoder)"
          + (f"; {report['ignored_from_target']} of its weights unused" if report["ignored_from_target"] else ""))
    if report["control_unet_differs"]:
        print(f"note: {report['control_unet_differs']} UNet tensors of CONTROL differ from BASE: CONTROL was "
              "trained from another base or with the SD unlocked; OUT has TARGET's UNet unchanged")
    print(f"written: {report['output']}")


if __name__ == "__main__":
    sys.exit(main())
