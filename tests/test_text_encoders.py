"""Tokenizer and text encoders against ids/outputs computed with transformers and open_clip (tiny weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import BPEVocabNotFoundError, CLIPTokenizer

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
PREFIX = "cond_stage_model."
Tiny = tuple[dict[str, Any], dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    meta_path = REFERENCE / "tiny_text_encoders.json"
    tensors_path = REFERENCE / "tiny_text_encoders.safetensors"
    if not (meta_path.is_file() and tensors_path.is_file()):
        pytest.skip(f"reference files tiny_text_encoders.json/.safetensors not found in {REFERENCE}")
    return json.loads(meta_path.read_text()), load_file(tensors_path)


@pytest.fixture(scope="module")
def layout() -> dict[str, Any]:
    path = REFERENCE / "checkpoint_layout_text_encoders.json"
    if not path.is_file():
        pytest.skip(f"reference file {path.name} not found in {REFERENCE}")
    return json.loads(path.read_text())


def _weights(tensors: dict[str, torch.Tensor], model: str) -> dict[str, torch.Tensor]:
    """Weights of one model under the names the embedder itself uses (checkpoint name minus the prefix)."""
    head = f"{model}.{PREFIX}"
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _tiny_v15(meta: dict[str, Any], layer: str, layer_idx: int | None = None) -> FrozenCLIPEmbedder:
    p = meta["v15_params"]
    assert p["hidden_act"] == "quick_gelu"
    return FrozenCLIPEmbedder(
        device="cpu",
        max_length=p["max_position_embeddings"],
        layer=layer,
        layer_idx=layer_idx,
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        vocab_size=p["vocab_size"],
        layer_norm_eps=p["layer_norm_eps"],
    )


def _tiny_v21(meta: dict[str, Any], tensors: dict[str, torch.Tensor], layer: str) -> FrozenOpenCLIPEmbedder:
    p = meta["v21_params"]
    embed_dim = tensors[f"v21.{PREFIX}model.text_projection"].shape[1]
    return FrozenOpenCLIPEmbedder(
        device="cpu",
        max_length=p["context_length"],
        layer=layer,
        width=p["width"],
        layers=p["layers"],
        heads=p["heads"],
        vocab_size=p["vocab_size"],
        embed_dim=embed_dim,
    )


def test_tokenizer_fact() -> None:
    ids = CLIPTokenizer()(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


@pytest.mark.parametrize(("key", "pad"), [("tokens.sd15", 49407), ("tokens.openclip", 0)])
def test_tokenizer_matches_reference(tiny: Tiny, key: str, pad: int) -> None:
    meta, tensors = tiny
    ids = CLIPTokenizer(pad_token_id=pad)(meta["prompts"])
    assert torch.equal(ids, tensors[key])
    empty = meta["prompts"].index("")
    assert ids[empty].tolist() == [49406, 49407] + [pad] * 75
    # The over-long prompt keeps start + 75 content tokens + end.
    longest = max(range(len(ids)), key=lambda i: len(meta["prompts"][i]))
    row = ids[longest].tolist()
    assert row[0] == 49406 and row[-1] == 49407 and 49407 not in row[1:-1] and 0 not in row


def test_missing_vocab_error(tmp_path: Path) -> None:
    with pytest.raises(BPEVocabNotFoundError, match="pip install --no-deps open-clip-torch"):
        CLIPTokenizer(vocab_path=tmp_path / "missing.txt.gz")
    assert issubclass(BPEVocabNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("layer", ["last", "penultimate"])
@pytest.mark.parametrize("with_position_ids", [False, True])
def test_v15_matches_reference(tiny: Tiny, layer: str, with_position_ids: bool) -> None:
    meta, tensors = tiny
    model = _tiny_v15(meta, layer)
    weights = _weights(tensors, "v15")
    if with_position_ids:
        weights["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    model.load_state_dict(weights, strict=True)
    ref = tensors["v15.out.last" if layer == "last" else "v15.out.penultimate_ln"]
    with torch.no_grad():
        out = model(meta["prompts"])
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-5
    # Pre-tokenised input gives the same result as text.
    with torch.no_grad():
        assert torch.equal(model.encode_tokens(tensors["tokens.sd15"]), out)


def test_v15_hidden_and_pooled(tiny: Tiny) -> None:
    meta, tensors = tiny
    weights = _weights(tensors, "v15")
    models = {}
    for layer in ("last", "pooled"):
        models[layer] = _tiny_v15(meta, layer)
        models[layer].load_state_dict(weights)
    hidden = _tiny_v15(meta, "hidden", layer_idx=-2)
    hidden.load_state_dict(weights)
    ln = hidden.transformer.text_model.final_layer_norm
    with torch.no_grad():
        assert _rel_err(ln(hidden(meta["prompts"])), tensors["v15.out.penultimate_ln"]) < 1e-5
        pooled = models["pooled"](["a photo of a cat"])
        last = models["last"](["a photo of a cat"])
    assert pooled.shape == (1, 1, 32)
    assert torch.equal(pooled[0, 0], last[0, 6])  # the first end token
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(layer="hidden")


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_v21_matches_reference(tiny: Tiny, layer: str) -> None:
    meta, tensors = tiny
    model = _tiny_v21(meta, tensors, layer)
    model.load_state_dict(_weights(tensors, "v21"), strict=True)
    ref = tensors[f"v21.out.{layer}"]
    with torch.no_grad():
        out = model(meta["prompts"])
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(("name", "factory"), [("v15", FrozenCLIPEmbedder), ("v21", FrozenOpenCLIPEmbedder)])
def test_full_size_layout(layout: dict[str, Any], name: str, factory: type[torch.nn.Module]) -> None:
    with torch.device("meta"):
        model = factory()
    shapes = {PREFIX + k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == layout[name]


def test_original_yaml_params() -> None:
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(freeze=True, layer="penultimate")
    assert model.layer == "penultimate"


@pytest.mark.parametrize("factory", [FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder])
def test_frozen_stays_eval(factory: type[torch.nn.Module]) -> None:
    kwargs = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    if factory is FrozenOpenCLIPEmbedder:
        kwargs = {"width": 8, "layers": 1, "heads": 2, "embed_dim": 8}
    model = factory(vocab_size=49408, **kwargs)
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    unfrozen = factory(freeze=False, vocab_size=49408, **kwargs)
    unfrozen.train()
    assert unfrozen.training and all(p.requires_grad for p in unfrozen.parameters())
