"""Turn a Stable Diffusion checkpoint into the starting checkpoint for training a ControlNet.

The ControlNet starts as a copy of SD's UNet encoder: each `control_model.X` takes `model.diffusion_model.X`
where that exists with the same shape (time embedding, input blocks, middle block), so training starts from
features SD already has. What the UNet has no counterpart for starts fresh: the hint block, and the zero
convolutions (`zero_convs`, `middle_block_out`), which are exactly zero, so that the untrained ControlLDM
reproduces SD's output. The UNet, VAE, text encoder and schedule come from the input unchanged. Weights the
model does not use (EMA copies, optimizer state) are left out.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tool_add_control.py sd.safetensors out.safetensors --config models/cldm_tiny.yaml
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
    check_control_fits,
    check_fits,
    check_is_sd,
    check_output_path,
    config_for_unet,
    control_weights,
    key_groups,
    load_state_dict,
    save_state_dict,
    unet_weights,
)
from cldm.model import create_model
from ldm.errors import DEBUG_HELP, command_line
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS


def add_control(input_path: str | Path, output_path: str | Path, config_path: str | Path | None = None,
                seed: int = 0, control_path: str | Path | None = None) -> dict[str, Any]:
    """Write OUTPUT, a ControlLDM checkpoint whose ControlNet is initialised from INPUT's UNet, or, with
    `control_path`, is that file's ControlNet (any layout: full, control-only, diffusers, difference over INPUT), to
    continue training an existing control on INPUT.

    The fresh parts (the hint block) are drawn from `seed`, so the same input and seed give the same
    checkpoint, and a training run from it is reproducible end to end; the caller's RNG is left untouched.

    Returns a report: the config used, how many weights came from INPUT, were copied into the ControlNet,
    are new (by part) and were ignored (by part).
    """
    out = check_output_path(output_path)
    sd = load_state_dict(input_path)
    check_is_sd(sd, input_path)
    config = str(config_path) if config_path is not None else config_for_unet(sd, UNET_PREFIX, str(input_path))
    model = create_model(config)
    expected = nn.Module.state_dict(model)  # names and shapes only: the deferred model is not initialised
    sd_keys = [k for k in expected if not k.startswith(CONTROL_PREFIX) and k not in SCHEDULE_BUFFERS]
    check_fits(sd, expected, str(input_path), config, sd_keys)
    weights, copied, new = _plan(sd, expected)
    from_input = len(weights) - len(copied)
    from_control = 0
    if control_path is not None:
        control = control_weights(load_state_dict(control_path), control_path, unet_weights(sd))
        check_control_fits(control, {k[len(CONTROL_PREFIX):]: v for k, v in expected.items()
                                     if k.startswith(CONTROL_PREFIX)}, str(control_path), config)
        for key in [k for k in weights if k.startswith(CONTROL_PREFIX)]:
            del weights[key]
        weights.update({CONTROL_PREFIX + k: v.to(expected[CONTROL_PREFIX + k].dtype) for k, v in control.items()})
        from_control, copied, new = len(control), [], []
    ignored = [k for k in sd if k not in expected]
    # `assign` makes INPUT's tensors the model's own (no 4 GB copy); only what `weights` lacks is initialised
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.load_state_dict(weights, strict=False, assign=True)
        del sd, weights
        state = model.state_dict()
    save_state_dict(state, out)
    return {
        "input": str(input_path), "output": str(out), "config": config,
        "from_input": from_input, "copied_to_control": len(copied), "from_control": from_control,
        "control": None if control_path is None else str(control_path),
        "new": len(new), "new_groups": key_groups(new),
        "schedule_from_config": len(expected) - from_input - len(copied) - len(new) - from_control,
        "ignored": len(ignored), "ignored_groups": key_groups(ignored),
    }


def _plan(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
          ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The weights to load (INPUT's, and copies of UNet tensors under ControlNet names), which were copied,
    which are new.

    Tensors are converted to the model's dtype (a float16 checkpoint gives a float32 one, as the original
    did), which copies only when the dtype differs; the ControlNet gets its own copy of each UNet tensor.
    Missing schedule buffers are neither loaded nor new: the model computes them from the config.
    """
    weights: dict[str, torch.Tensor] = {}
    copied: list[str] = []
    new: list[str] = []
    for key, want in expected.items():
        source = UNET_PREFIX + key[len(CONTROL_PREFIX):] if key.startswith(CONTROL_PREFIX) else key
        tensor = sd.get(source)
        if tensor is None or tensor.shape != want.shape:
            if key.startswith(CONTROL_PREFIX):  # the others are schedule buffers: the config computes them
                new.append(key)
            continue
        tensor = tensor.to(want.dtype)
        if source != key:
            tensor = tensor.clone() if tensor is sd[source] else tensor
            copied.append(key)
        weights[key] = tensor
    return weights, copied, new


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(epilog=DEBUG_HELP, description=(
        "Make a ControlNet training checkpoint from a Stable Diffusion "
        "checkpoint: the ControlNet starts as a copy of the UNet encoder."))
    parser.add_argument("input", help="Stable Diffusion checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output", help="checkpoint to write (.ckpt, .pth or .safetensors); must not exist")
    parser.add_argument("--config", default=None,
                        help="model config (default: models/cldm_v15.yaml or models/cldm_v21.yaml, "
                             "from the checkpoint's text width)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh hint-block weights (default 0)")
    parser.add_argument("--control", default=None,
                        help="start from this ControlNet instead (any layout: full or control-only checkpoint, "
                             "diffusers folder, difference file over INPUT): to train an existing control further")
    args = parser.parse_args(argv)
    _print_report(add_control(args.input, args.output, args.config, seed=args.seed, control_path=args.control))
    return 0


def _print_report(report: Mapping[str, Any]) -> None:
    print(f"config: {report['config']}")
    print(f"taken from the input: {report['from_input']} weights; copied from the UNet into the ControlNet: "
          f"{report['copied_to_control']}")
    if report["from_control"]:
        print(f"ControlNet taken from {report['control']}: {report['from_control']} weights")
    else:
        print(f"new (fresh initialisation, zero convs at zero): {report['new']} weights in "
              + ", ".join(f"{group} ({n})" for group, n in report["new_groups"].items()))
    if report["schedule_from_config"]:
        print(f"schedule buffers computed from the config: {report['schedule_from_config']}")
    if report["ignored"]:
        print(f"ignored (not used by the model): {report['ignored']} weights in "
              + ", ".join(f"{group} ({n})" for group, n in report["ignored_groups"].items()))
    print(f"written: {report['output']}")


if __name__ == "__main__":
    sys.exit(main())
