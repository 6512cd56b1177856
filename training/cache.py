"""Opt-in cache of what the frozen parts compute: VAE posterior moments of the targets, prompt embeddings.

Training a ControlNet never changes the VAE or the text encoder, yet every step runs both: at 256 px the
VAE encoder alone costs about as much as the UNet's forward pass. `build_cache` runs them once per item
and stores the results as safetensors shards; `CachedDataset` then serves items with `latent_moments`
and `context` instead of `jpg`, and `cached_batch_encoder` (the model's `batch_encoder` while training from the
cache) turns those into the step's latents and text conditioning without running either encoder.

What is stored, and why:

* The posterior's *moments* (mean and log-variance, `[2 * z, h, w]`), not a latent: the training step
  still samples `mean + std * eps` with the global RNG, so a cached run draws the same latents, in the
  same RNG order, as an uncached one (equal losses at equal seeds, to float tolerance).
* One embedding per distinct prompt text (`[77, D]`), always including the empty prompt, so that prompt
  dropout (`ControlDataset(drop_prompt=...)`, or `CachedDataset.empty_context()` for dropout drawn at
  training time) needs no text encoder either. SDXL's is what its two text encoders make of the text (`context/<key>.
  crossattn`, `[77, 2048]`, and the pooled `context/<key>.vector`, `[1280]`): the size embeddings, which differ per
  item, are added at each step by the conditioner (`LatentDiffusion.conditioning_from_text`), from the item's size
  conditionings, which the cached item carries (its placement is fixed: random crops are not cached).

Keys, and invalidation: an item's key is the sha256 of (cache format version, model fingerprint, the item's
identity: the sha256 of its target's bytes and the geometry it is placed with); a prompt's key is the sha256 of
(version, fingerprint, text). A changed image therefore has a new key and is re-encoded by the next `build_cache`,
a changed VAE or text encoder (`model_fingerprint`) changes every key, and entries that no current key
names are simply never read (`CacheReport.stale` counts them; delete the folder to reclaim the space).
Shards are written to a temporary name and renamed, so an interrupted build leaves no partial shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ldm.errors import UserError
from ldm.models.diffusion.conditioning import Context, map_context, rows_of
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.conditioner import sizes_of
from training.dataset import PairedDataset, size_conditionings

#: Bump when what is stored, or how keys are made, changes: every older entry then goes stale.
CACHE_VERSION = 2
#: Elements of each tensor that `model_fingerprint` hashes (evenly spaced), besides every name and shape.
FINGERPRINT_SAMPLES = 4096
MOMENTS_PREFIX = "moments/"
CONTEXT_PREFIX = "context/"
SHARD_SUFFIX = ".safetensors"


class CacheMissError(UserError, LookupError):
    """An item or prompt of the data set has no entry for this model: run `build_cache` first."""


class StaleCacheError(UserError, RuntimeError):
    """A target image changed after the `CachedDataset` was opened: its cached latent no longer applies."""


@dataclass
class CacheReport:
    """What one `build_cache` did."""

    fingerprint: str
    items: int
    encoded: int
    reused: int
    prompts: int
    prompts_encoded: int
    shards_written: int
    stale: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- keys --------------------------------------------------------------------------------------------------
def _sha256(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        digest.update(data)
    return digest.hexdigest()


def item_key(fingerprint: str, identity: str) -> str:
    """Key of a target's moments: changes with the model and the item's identity (its image bytes and geometry)."""
    return _sha256(f"v{CACHE_VERSION}", "moments", fingerprint, identity)


def prompt_key(fingerprint: str, text: str) -> str:
    """Key of a prompt's embedding: changes with the model and the text."""
    return _sha256(f"v{CACHE_VERSION}", "context", fingerprint, text)


def _config_json(config: Any) -> str:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, DictConfig | ListConfig):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        pass
    return json.dumps(config, sort_keys=True, default=str)


def model_fingerprint(model: Any, full: bool = False) -> str:
    """A cheap hash of what the cached values depend on: the VAE's and the text encoder's weights and configs.

    Hashed: the class and config of `first_stage_model` and the text part (so e.g. the text encoder's
    `layer` choice counts), every tensor's name, shape and dtype, and `FINGERPRINT_SAMPLES` evenly spaced
    elements of each tensor. Loading other weights (another checkpoint, a fine-tuned VAE) changes nearly
    every element and so the fingerprint; an edit that touches none of the sampled elements of any tensor
    would go unnoticed, which is the price of hashing ~2 MB instead of SD1.5's ~830 MB (about a second).
    `full=True` hashes every byte. A deferred model is materialised first, as encoding would do.
    """
    if callable(getattr(model, "materialize", None)):
        model.materialize()
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    configs = getattr(model, "part_configs", {})
    for part in ("first_stage_model", model.text_part):
        module = model.get_submodule(part)
        digest.update(f"{part}:{type(module).__module__}.{type(module).__qualname__}".encode())
        digest.update(_config_json(configs.get(part)).encode())
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if not full and flat.numel() > FINGERPRINT_SAMPLES:
                flat = flat[:: flat.numel() // FINGERPRINT_SAMPLES][:FINGERPRINT_SAMPLES]
            digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----- the store -------------------------------------------------------------------------------------------
def _entry(name: str) -> str:
    """The entry a stored tensor belongs to: `context/<key>.crossattn` -> `context/<key>` (SDXL's text has parts)."""
    return name.split(".", 1)[0]


def _context_tensors(name: str, context: Any) -> dict[str, torch.Tensor]:
    """One prompt's text encoding as stored tensors: `name` itself, or `name.<part>` for each part of a mapping."""
    if isinstance(context, Mapping):
        return {f"{name}.{part}": value for part, value in context.items()}
    return {name: context}


def _shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("*" + SHARD_SUFFIX) if p.is_file())


def index_shards(cache_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Every stored tensor name (`moments/<key>`, `context/<key>`) and the shard holding it.

    Only the shards' JSON headers are read.
    """
    index: dict[str, Path] = {}
    for path in _shard_paths(Path(cache_dir)):
        with safe_open(str(path), framework="pt") as shard:
            index.update((name, path) for name in shard.keys())  # noqa: SIM118 - safe_open has no __iter__
    return index


def _write_shard(cache_dir: Path, fingerprint: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a shard under a fresh name, atomically (temporary file, then rename)."""
    path = cache_dir / f"{fingerprint[:16]}-{uuid.uuid4().hex[:16]}{SHARD_SUFFIX}"
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"fingerprint": fingerprint, "version": str(CACHE_VERSION)})
    os.replace(partial, path)
    return path


def _batches(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


@torch.no_grad()
def build_cache(model: Any, dataset: PairedDataset, cache_dir: str | os.PathLike[str], batch_size: int = 8,
                shard_size: int = 256, fingerprint: str | None = None) -> CacheReport:
    """Encode whatever the cache lacks for `dataset` under `model`; reuse the rest.

    Targets are VAE-encoded `batch_size` at a time (on the model's device, in float32) and stored with the
    embeddings of prompts not seen before, `shard_size` items per shard. `dataset` is a PairedDataset
    (its `prompt(i)`, after prompt dropout, names the embedding an item uses).
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint or model_fingerprint(model)
    stored = {_entry(name) for name in index_shards(cache_dir)}
    keys = [item_key(fingerprint, dataset.cache_identity(i)) for i in range(len(dataset))]
    texts = sorted({"", *(dataset.prompt(i) for i in range(len(dataset)))})
    wanted = {MOMENTS_PREFIX + k for k in keys} | {CONTEXT_PREFIX + prompt_key(fingerprint, t) for t in texts}
    todo: list[int] = []  # items to encode; identical target files (same key) only once
    scheduled: set[str] = set()
    for i, key in enumerate(keys):
        if MOMENTS_PREFIX + key not in stored and key not in scheduled:
            scheduled.add(key)
            todo.append(i)
    reused = sum(1 for key in keys if MOMENTS_PREFIX + key in stored)
    missing_texts = [t for t in texts if CONTEXT_PREFIX + prompt_key(fingerprint, t) not in stored]

    pending: dict[str, torch.Tensor] = {}
    shards = 0

    def flush() -> None:
        nonlocal pending, shards
        if pending:
            _write_shard(cache_dir, fingerprint, pending)
            pending, shards = {}, shards + 1

    for chunk in _batches(missing_texts, batch_size):
        encodings = model.text_encodings(list(chunk))
        for row, text in enumerate(chunk):
            row_encoding = rows_of(encodings, row)
            for name, value in _context_tensors(CONTEXT_PREFIX + prompt_key(fingerprint, text), row_encoding).items():
                pending[name] = value.float().cpu()
    todo.sort(key=dataset.output_size)  # a batch needs one size: with --buckets, items come in several
    for chunk in (c for size, group in groupby(todo, key=dataset.output_size)
                  for c in _batches(list(group), batch_size)):
        images = np.stack([dataset[i]["jpg"] for i in chunk])
        x = torch.from_numpy(images).to(model.device).permute(0, 3, 1, 2).contiguous().float()
        moments = _posterior_moments(model.encode_first_stage(x))
        for i, m in zip(chunk, moments):
            pending[MOMENTS_PREFIX + keys[i]] = m.float().cpu()
        if sum(name.startswith(MOMENTS_PREFIX) for name in pending) >= shard_size:
            flush()
    flush()
    stale = sum(1 for name in stored if name not in wanted)
    return CacheReport(fingerprint=fingerprint, items=len(keys), encoded=len(todo),
                       reused=reused, prompts=len(texts),
                       prompts_encoded=len(missing_texts), shards_written=shards, stale=stale,
                       seconds=time.perf_counter() - start)


def _posterior_moments(posterior: Any) -> torch.Tensor:
    """The `[B, 2 * z, h, w]` parameters of a DiagonalGaussianDistribution (or a plain latent as is)."""
    if isinstance(posterior, torch.Tensor):
        raise TypeError("this first stage returns latents, not a posterior: nothing stochastic to cache as "
                        "moments")
    return posterior.parameters


def cached_batch_encoder(model: Any, batch: Mapping[str, Any], key: str, bs: int | None) -> tuple[Any, Context]:
    """A batch of cached items as the model's step needs it (a `LatentDiffusion.batch_encoder`): the VAE posterior
    from `latent_moments` (sampled by the step with the global RNG, as without the cache), or a first stage's
    deterministic `latent`, and the prompts' context from the cached `context` (SDXL's completed with the batch's
    size conditionings)."""
    def first(values: torch.Tensor) -> torch.Tensor:
        return (values if bs is None else values[:bs]).to(model.device)

    if "latent_moments" in batch:
        posterior: Any = DiagonalGaussianDistribution(first(batch["latent_moments"]).float())
    else:
        posterior = first(batch["latent"]).float()
    latent = posterior.mean if isinstance(posterior, DiagonalGaussianDistribution) else posterior
    text = map_context(batch["context"], first)
    sizes = None
    if model.has_conditioner:
        factor = model.latent_factor
        sizes = sizes_of(batch, latent.shape[0], latent.shape[2] * factor, latent.shape[3] * factor)
    return posterior, model.conditioning_from_text(text, sizes)


class CachedDataset(Dataset):
    """A ControlDataset whose items come with cached moments and prompt embeddings instead of the target.

    Items: `latent_moments` (`[2 * z, h, w]` float32), `context` (`[77, D]`; SDXL's text parts, see the module's
    docstring), `hint` (as the data set gives it), `txt`, and with the data set's `size_conditioning` its size
    conditionings. Opening hashes every target file and checks that all items and prompts are cached for
    `model_fingerprint` (`CacheMissError` otherwise). With `verify` (default) each item's target is hashed
    again when read, so an image edited during training raises `StaleCacheError` instead of silently
    training on its old latent; reading the file costs far less than decoding it.
    """

    def __init__(self, dataset: PairedDataset, cache_dir: str | os.PathLike[str], model_fingerprint: str,
                 verify: bool = True) -> None:
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.fingerprint = model_fingerprint
        self.verify = verify
        self._content = [dataset.cache_identity(i) for i in range(len(dataset))]
        self._index = index_shards(self.cache_dir)
        self._parts: dict[str, list[str]] = {}  # entry -> its tensors' names
        for name in self._index:
            self._parts.setdefault(_entry(name), []).append(name)
        self._handles: dict[Path, Any] = {}
        missing = [i for i in range(len(dataset)) if self._moments_name(i) not in self._parts]
        missing_texts = sorted({t for t in self._texts() if self._context_name(t) not in self._parts})
        if missing or missing_texts:
            first = (f"item {missing[0]} ({dataset.source.where(missing[0])})" if missing
                     else f"prompt {missing_texts[0]!r}")
            raise CacheMissError(f"{self.cache_dir}: {len(missing)} items and {len(missing_texts)} prompts are not "
                                 f"cached for model {model_fingerprint[:12]}, e.g. {first}; run build_cache")

    def _texts(self) -> Iterable[str]:
        yield ""
        yield from (self.dataset.prompt(i) for i in range(len(self.dataset)))

    def _moments_name(self, index: int) -> str:
        return MOMENTS_PREFIX + item_key(self.fingerprint, self._content[index])

    def _context_name(self, text: str) -> str:
        return CONTEXT_PREFIX + prompt_key(self.fingerprint, text)

    def _tensor(self, name: str) -> torch.Tensor:
        path = self._index[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle.get_tensor(name)

    def __getstate__(self) -> dict[str, Any]:
        """Open shard handles stay behind when DataLoader workers get a copy: each process opens its own."""
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def _context(self, text: str) -> Context:
        name = self._context_name(text)
        if self._parts[name] == [name]:
            return self._tensor(name)
        return {part.split(".", 1)[1]: self._tensor(part) for part in self._parts[name]}

    def empty_context(self) -> Context:
        """The cached embedding of the empty prompt, `[77, D]`: for prompt dropout decided at training time."""
        return self._context("")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index %= len(self.dataset)
        if self.verify and self.dataset.cache_identity(index) != self._content[index]:
            raise StaleCacheError(f"{self.dataset.source.where(index)} changed after the cache was opened; "
                                  "run build_cache again and reopen the CachedDataset")
        text = self.dataset.prompt(index)
        hint, placement = self.dataset.hint(index)
        item = {
            "latent_moments": self._tensor(self._moments_name(index)),
            "context": self._context(text),
            "hint": hint,
            "txt": text,
        }
        if self.dataset.size_conditioning:
            item.update(size_conditionings(placement))
        return item
