"""Text-to-image generation with ControlNet units, as the web UI's ControlNet extension sets them up.

`ControlNetPipeline` loads a model once and turns a prompt plus any number of `ControlUnit`s into images.
Each unit names a control image, how to preprocess it (annotator, thresholds, resolution, invert, channel
order, resize mode) and how strongly and when its ControlNet steers sampling (weight, guidance window,
control mode, guess mode); `cldm.control` holds the formulas. Several units make a Multi-ControlNet: their
residuals are summed. Sampling goes through the model's one path (`ControlLDM.sample_latents`), as training-time
logging and fidelity scoring do.

Checkpoints come in two layouts: a full ControlLDM file (ControlNet 1.0 style, SD and control weights in
one) or a Stable Diffusion file plus control-only files (ControlNet 1.1 style, keys with or without the
`control_model.` prefix); `.ckpt`, `.pth` and `.safetensors` all load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cldm.annotators import PREPROCESSORS, Preprocessor, get_preprocessor
from cldm.checkpoint import (
    CONTROL_PREFIX,
    UNET_PREFIX,
    CheckpointError,
    check_control_fits,
    check_family,
    context_dim_of,
    control_weights,
    has_unet,
    load_state_dict,
    sha256_short,
    unet_weights,
)
from cldm.control import CONTROL_MODES, Control, ControlMode
from cldm.control_image import (
    RESIZE_MODES,
    ResizeMode,
    invert,
    pixel_perfect_resolution,
    resize_for_output,
    rgb_to_bgr,
    to_rgb_uint8,
)
from cldm.model import create_model
from ldm.errors import InputError, MissingFileError
from ldm.models.diffusion.conditioning import map_context
from ldm.models.diffusion.sampling import SAMPLERS
from ldm.modules.encoders.conditioner import SIZE_KEYS
from ldm.util import instantiate_from_config

#: The original ControlNet gradio demos' guidance scale, which the released models were shown with
#: (the web UI's own default is 7).
DEFAULT_CFG_SCALE = 9.0
#: Maps whose exact pixel values carry meaning (class colours, binary strokes) are resized with
#: nearest-neighbour so that no in-between colours appear.
NEAREST_RESIZE_PREPROCESSORS = frozenset({"seg", "scribble"})
#: Hex digits of the sha256s a settings record carries for each file: enough to tell which file made an image.
RECORD_HASH_LENGTH = 12

#: The pipeline's arguments for SDXL's size conditionings (in `SIZE_KEYS` order), as its settings record names them.
SIZE_ARGUMENTS = ("original_size", "crop_top_left", "target_size")
#: Keys that `ControlUnit.settings()` and the pipeline add to a unit's record, ignored when reading one back.
RECORD_ONLY_KEYS = frozenset({"image_sha256", "model_name"})

ImageSource = np.ndarray | Image.Image | str | Path


def record_hash(path: str | Path) -> str:
    """The short sha256 a settings record keeps of a file."""
    return sha256_short(path, RECORD_HASH_LENGTH)


def load_image(source: ImageSource) -> np.ndarray:
    """HWC uint8 RGB from an array, a PIL image or an image file; one-line errors for bad files."""
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({type(err).__name__})") from err


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    return to_rgb_uint8(np.asarray(img.convert("RGBA" if has_alpha else "RGB")))


def image_sha256(source: ImageSource) -> str:
    """The file's hash for a path; the RGB pixels' hash for an in-memory image."""
    if isinstance(source, str | Path):
        return record_hash(source)
    pixels = np.ascontiguousarray(load_image(source)).tobytes()
    return hashlib.sha256(pixels).hexdigest()[:RECORD_HASH_LENGTH]


@dataclass
class ControlUnit:
    """One ControlNet unit with the web UI's settings.

    `threshold_a`/`threshold_b` mean what `cldm.annotators.PREPROCESSOR_INFO` says for the preprocessor
    (None: its default). `pixel_perfect` replaces `annotator_resolution` with the size the map will have
    after resizing to the output. `model` picks the loaded ControlNet by index, name or file path.
    """

    image: ImageSource
    preprocessor: str = "none"
    threshold_a: float | None = None
    threshold_b: float | None = None
    annotator_resolution: int = 512
    pixel_perfect: bool = False
    invert: bool = False
    rgb_to_bgr: bool = False
    resize_mode: ResizeMode = "just_resize"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = "balanced"
    guess_mode: bool = False
    model: int | str = 0

    def __post_init__(self) -> None:
        self.preprocessor = str(self.preprocessor).strip().lower()
        if self.preprocessor not in PREPROCESSORS:
            raise InputError(f"unknown preprocessor {self.preprocessor!r}; known: {', '.join(PREPROCESSORS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"unknown resize mode {self.resize_mode!r}; known: {', '.join(RESIZE_MODES)}")
        if self.control_mode not in CONTROL_MODES:
            raise InputError(f"unknown control mode {self.control_mode!r}; known: {', '.join(CONTROL_MODES)}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise InputError(f"guidance window must satisfy 0 <= start <= end <= 1, got "
                             f"[{self.guidance_start}, {self.guidance_end}]")
        if int(self.annotator_resolution) <= 0:
            raise InputError(f"annotator_resolution must be positive, got {self.annotator_resolution}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> ControlUnit:
        """A unit from a settings mapping (a units file or a PNG record); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known - RECORD_ONLY_KEYS)
        if unknown:
            raise InputError(f"unknown control unit setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "image" not in settings:
            raise InputError("a control unit needs an 'image'")
        return cls(**{k: v for k, v in settings.items() if k in known})

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings; the image as its path (None for in-memory images) and hash."""
        out = {k: v for k, v in asdict(self).items() if k != "image"}
        out["image"] = str(self.image) if isinstance(self.image, str | Path) else None
        out["image_sha256"] = image_sha256(self.image)
        return out


@dataclass
class GenerationResult:
    images: list[Image.Image]
    control_maps: list[Image.Image]
    settings: dict[str, Any] = field(default_factory=dict)


def prepare_control_map(image: np.ndarray, unit: ControlUnit, preprocessor: Preprocessor, width: int,
                        height: int) -> np.ndarray:
    """The unit's control map at the output size, HWC uint8 RGB.

    Order as in the web UI: normalise to RGB, invert and/or swap channels, run the annotator at its
    resolution (pixel perfect: the size the map will be shown at), then resize with the unit's mode.
    """
    rgb = to_rgb_uint8(image)
    if unit.invert:
        rgb = invert(rgb)
    if unit.rgb_to_bgr:
        rgb = rgb_to_bgr(rgb)
    resolution = (pixel_perfect_resolution(rgb.shape[:2], (height, width), unit.resize_mode)
                  if unit.pixel_perfect else int(unit.annotator_resolution))
    detected = to_rgb_uint8(preprocessor(rgb, resolution, unit.threshold_a, unit.threshold_b))
    nearest = unit.preprocessor in NEAREST_RESIZE_PREPROCESSORS
    return resize_for_output(detected, width, height, unit.resize_mode, nearest=nearest)


def hint_tensor(control_map: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> float [1, 3, H, W] in [0, 1], the hint the ControlNet was trained on."""
    return torch.from_numpy(control_map.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def _build_control_net(config: Any, weights: Mapping[str, torch.Tensor], path: str | Path) -> nn.Module:
    """A further ControlNet, built without random initialisation and filled from `weights` (checked to fit)."""
    with torch.device("meta"):
        net = instantiate_from_config(config)
    check_control_fits(weights, nn.Module.state_dict(net), str(path), "the config's ControlNet")
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval().requires_grad_(False)


class ControlNetPipeline:
    """A loaded ControlLDM plus any further ControlNets, ready to generate with `ControlUnit`s.

    `controls[k]` is ControlNet k, named `control_names[k]` (its file path when loaded from files).
    `sources` records the config and checkpoint files (with short sha256s) for reproducibility.
    The model is put in eval mode (and cast to `dtype`, placed on `device`); its `requires_grad` flags are left as
    they are (generation runs under `torch.no_grad`), so a model being trained can be sampled and trained on.
    """

    def __init__(self, model: Any, controls: Sequence[nn.Module] | None = None,
                 control_names: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 annotator_dir: str | Path | None = None, sources: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        model.materialize()
        self.model = model.eval()
        self.controls = list(controls) if controls is not None else [model.control_model]
        self.control_names = (list(control_names) if control_names is not None
                              else [f"control{k}" for k in range(len(self.controls))])
        if len(self.control_names) != len(self.controls):
            raise ValueError("control_names must name each control")
        self.device = torch.device(device)
        self.annotator_dir = annotator_dir
        self.sources = dict(sources or {})
        self._preprocessors: dict[str, Preprocessor] = {}
        #: The networks' dtype (float16 halves their memory); the sampler's arithmetic stays float32.
        self.dtype = dtype
        for part in self._all_parts():
            part.to(dtype)
        self._place(self._all_parts())

    @classmethod
    def from_checkpoints(cls, config: str | Path, ckpt: str | Path, base: str | Path | None = None,
                         extra_controls: Sequence[str | Path] = (), device: str | torch.device = "cpu",
                         annotator_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
                         ) -> ControlNetPipeline:
        """Load a full ControlLDM `ckpt`, or SD weights from `base` plus control weights from `ckpt`.

        `extra_controls` are further control files (control-only or full) for Multi-ControlNet; they must
        fit the config's ControlNet architecture.
        """
        main = load_state_dict(ckpt)
        if base is None and not has_unet(main):
            raise CheckpointError(f"{ckpt}: holds only ControlNet weights; also pass the Stable Diffusion "
                                  "checkpoint it was trained for as base (--base)")
        sd_path = ckpt if base is None else base
        sd = {k: v for k, v in (main if base is None else load_state_dict(base)).items()
              if not k.startswith(CONTROL_PREFIX)}
        base_unet = unet_weights(sd)
        control = control_weights(main, ckpt, base_unet)
        extras = [control_weights(load_state_dict(path), path, base_unet) for path in extra_controls]
        model = create_model(config)
        want = context_dim_of(nn.Module.state_dict(model.control_model), "")
        for weights, path in zip([control, *extras], [ckpt, *extra_controls]):
            check_family(weights, "", want, str(path), config)
        check_family(sd, UNET_PREFIX, want, str(sd_path), config)
        model.load_state_dict({**sd, **{CONTROL_PREFIX + k: v for k, v in control.items()}})
        controls: list[nn.Module] = [model.control_model]
        for weights, path in zip(extras, extra_controls):
            controls.append(_build_control_net(model.part_configs["control_model"], weights, path))
        sources = {
            "config": str(config),
            "ckpt": {"path": str(ckpt), "sha256": record_hash(ckpt)},
            "base": None if base is None else {"path": str(base), "sha256": record_hash(base)},
            "extra_controls": [{"path": str(p), "sha256": record_hash(p)} for p in extra_controls],
        }
        names = [str(ckpt), *(str(p) for p in extra_controls)]
        return cls(model, controls, names, device=device, annotator_dir=annotator_dir, sources=sources,
                   dtype=dtype)

    # ----- placement --------------------------------------------------------------------------------------
    def _text_parts(self) -> list[nn.Module]:
        return [self.model.text_encoder]

    def _denoise_parts(self) -> list[nn.Module]:
        return [self.model.model, *self.controls]

    def _vae_parts(self) -> list[nn.Module]:
        return [self.model.first_stage_model]

    def _all_parts(self) -> list[nn.Module]:
        return self._text_parts() + self._denoise_parts() + self._vae_parts()

    def _place(self, on_device: Sequence[nn.Module], low_vram: bool = False) -> None:
        """Put `on_device` on the accelerator; with `low_vram` every other part goes to the CPU first."""
        if low_vram:
            keep = {id(m) for m in on_device}
            for part in self._all_parts():
                if id(part) not in keep:
                    part.to("cpu")
        for part in on_device:
            part.to(self.device)
        if low_vram and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- units ------------------------------------------------------------------------------------------
    def control_index(self, ref: int | str) -> int:
        """Which loaded ControlNet a unit means: an index, a name (file path) or a file name."""
        if isinstance(ref, int) and not isinstance(ref, bool):
            if 0 <= ref < len(self.controls):
                return ref
        elif isinstance(ref, str):
            if ref.isdigit() and int(ref) < len(self.controls):
                return int(ref)
            for k, name in enumerate(self.control_names):
                if ref in (name, Path(name).name, Path(name).stem) or Path(ref) == Path(name):
                    return k
        raise InputError(f"unit model {ref!r} is not loaded; loaded: "
                         + ", ".join(f"{k}={name}" for k, name in enumerate(self.control_names)))

    def preprocessor(self, name: str) -> Preprocessor:
        """One preprocessor per name per pipeline, so network annotators load their weights once."""
        if name not in self._preprocessors:
            self._preprocessors[name] = get_preprocessor(name, self.annotator_dir, self.device)
        return self._preprocessors[name]

    def control_map(self, unit: ControlUnit, width: int, height: int) -> np.ndarray:
        return prepare_control_map(load_image(unit.image), unit, self.preprocessor(unit.preprocessor), width, height)

    # ----- generation -------------------------------------------------------------------------------------
    def _sizes(self, batch: int, output: tuple[int, int], original: Sequence[int] | None,
               crop_top_left: Sequence[int] | None, target: Sequence[int] | None) -> dict[str, torch.Tensor] | None:
        """SDXL's size conditionings for the batch (None for SD1.x/2.x, which refuse them when set)."""
        if not self.model.has_conditioner:
            if original is not None or target is not None or crop_top_left is not None:
                raise InputError("original_size, crop and target_size are SDXL's micro-conditioning; this model "
                                 "is not SDXL")
            return None
        rows = {"original_size_as_tuple": original or output, "crop_coords_top_left": crop_top_left or (0, 0),
                "target_size_as_tuple": target or output}
        for name, pair in rows.items():
            if len(pair) != 2 or any(int(v) < 0 for v in pair):
                raise InputError(f"{name} must be two non-negative numbers, got {pair}")
        return {name: torch.tensor([[float(v) for v in pair]]).repeat(batch, 1) for name, pair in rows.items()}

    def latent_factor(self) -> int:
        """Pixels per latent cell: the VAE's downsampling (8 for SD and the tiny config)."""
        return self.model.latent_factor

    def size_multiple(self) -> int:
        """Pixel sizes must divide into the VAE's and then the UNet's downsampling (64 for SD).

        The UNet's skip connections need every level's size to halve exactly; other sizes would fail deep
        inside the UNet with a shape mismatch.
        """
        unet_factor = 2 ** (len(self.model.model.diffusion_model.spec.channel_mult) - 1)
        return self.latent_factor() * unet_factor

    def _check_request(self, width: int, height: int, steps: int, sampler: str, batch_size: int) -> None:
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise InputError(f"width and height must be positive multiples of 8, got {width}x{height}")
        multiple = self.size_multiple()
        if width % multiple or height % multiple:
            raise InputError(f"this model needs width and height in multiples of {multiple} (the latent is "
                             f"downsampled {multiple // self.latent_factor()}x in its UNet), got {width}x{height}")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")

    @torch.no_grad()
    def __call__(self, prompt: str, units: Sequence[ControlUnit] = (), negative_prompt: str = "",
                 width: int | None = None, height: int | None = None, steps: int = 20,
                 cfg_scale: float = DEFAULT_CFG_SCALE,
                 seed: int = 0, sampler: str = "ddim", eta: float = 0.0, batch_size: int = 1,
                 low_vram: bool = False, progress: bool = True, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None
                 ) -> GenerationResult:
        """Generate `batch_size` images of `width x height` for `prompt`, steered by `units`; the size defaults to
        the model's own (its config's `image_size` in pixels: 512 for SD1.5 and SD2.1, 1024 for SDXL).

        `eta` is DDIM's noise (0: deterministic); DPM++ 2M is deterministic and ignores it. The initial
        noise comes from a CPU generator seeded with `seed`, so it is the same on every device.

        SDXL's micro-conditioning: `original_size` and `target_size` as (height, width), default the output's
        size, and `crop_top_left` as (top, left), default (0, 0), as diffusers' defaults. An empty negative prompt
        is SDXL's zero text embedding (sgm's and diffusers' `force_zeros_for_empty_prompt`); SD1.x/2.x encode "".
        """
        native = self.model.image_size * self.latent_factor()
        width, height = native if width is None else width, native if height is None else height
        self._check_request(width, height, steps, sampler, batch_size)
        indices = [self.control_index(unit.model) for unit in units]
        maps = [self.control_map(unit, width, height) for unit in units]
        model = self.model

        sizes = self._sizes(batch_size, (height, width), original_size, crop_top_left, target_size)
        self._place(self._text_parts(), low_vram)
        cond = model.get_learned_conditioning([prompt] * batch_size, sizes)
        uncond = None
        if cfg_scale != 1.0:
            uncond = (model.get_unconditional_conditioning(batch_size, sizes) if not negative_prompt
                      else model.get_learned_conditioning([negative_prompt] * batch_size, sizes))

        self._place(self._denoise_parts(), low_vram)
        cond = map_context(cond, lambda t: t.to(self.device))
        uncond = None if uncond is None else map_context(uncond, lambda t: t.to(self.device))
        controls = [
            Control(self.controls[k], hint_tensor(control_map).to(self.device), unit.weight, unit.guidance_start,
                    unit.guidance_end, unit.control_mode, unit.guess_mode)
            for unit, k, control_map in zip(units, indices, maps)
        ]
        factor = self.latent_factor()
        shape = (batch_size, model.channels, height // factor, width // factor)
        x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).to(self.device)
        step_noise = torch.Generator(self.device).manual_seed(seed)
        z = model.sample_latents(x, cond, controls, uncond, cfg_scale, sampler=sampler, steps=steps, eta=eta,
                                 generator=step_noise, progress=progress)

        self._place(self._vae_parts(), low_vram)
        pixels = model.decode_first_stage(z.to(self.device))
        array = (pixels.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
        settings = {
            "prompt": prompt, "negative_prompt": negative_prompt, "width": width, "height": height,
            "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "sampler": sampler, "eta": eta,
            "batch_size": batch_size, "low_vram": low_vram,
            **({} if sizes is None else {name: [int(v) for v in sizes[key][0].tolist()]
                                         for name, key in zip(SIZE_ARGUMENTS, SIZE_KEYS)}),
            "units": [{**unit.settings(), "model_name": self.control_names[k]} for unit, k in zip(units, indices)],
            "models": self.sources,
        }
        return GenerationResult([Image.fromarray(a) for a in array], [Image.fromarray(m) for m in maps], settings)
