"""The same items written in every data layout tutorial_train.py reads, the way each layout's own tools write it:
`datasets` for `save_to_disk` and parquet, a `metadata.jsonl` image folder as diffusers documents it, kohya's caption
files, `make_webdataset.py` (one item per shard) for tar shards. Used by tests/test_layouts.py and bench_loaders.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from training.make_fill50k import make_fill50k
from training.make_webdataset import shard_pattern, write_shards
from training.sources import PromptJsonSource

LAYOUTS = ("prompt_json", "hf_disk", "parquet", "imagefolder", "folder", "webdataset")


def write_every_layout(root: Path, n: int, size: int, shard_size: int = 1) -> dict[str, str]:
    """`n` Fill50K items of `size` pixels in every layout under `root`; the `--data` value of each. With one item
    per shard (the default) a stream's order is the map-style sampler's."""
    import datasets

    fill = root / "prompt_json"
    make_fill50k(fill, n=n, size=size, seed=0)
    records = [json.loads(line) for line in (fill / "prompt.json").read_text().splitlines()]
    names = [f"{i:05d}.png" for i in range(len(records))]

    def image_cells(key: str) -> list[dict[str, Any]]:
        return [{"bytes": (fill / r[key]).read_bytes(), "path": None} for r in records]

    table = datasets.Dataset.from_dict(
        {"image": image_cells("target"), "conditioning_image": image_cells("source"),
         "text": [r["prompt"] for r in records]},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "text": datasets.Value("string")}))
    table.save_to_disk(str(root / "hf_disk"))
    table.to_parquet(str(root / "items.parquet"))

    folder, imagefolder = root / "folder", root / "imagefolder"
    for sub in ("images", "conditioning"):
        (folder / sub).mkdir(parents=True)
        (imagefolder / sub).mkdir(parents=True)
    with open(imagefolder / "metadata.jsonl", "w") as metadata:
        for name, record in zip(names, records):
            for base in (folder, imagefolder):
                shutil.copy(fill / record["target"], base / "images" / name)
                shutil.copy(fill / record["source"], base / "conditioning" / name)
            (folder / "images" / name).with_suffix(".txt").write_text(record["prompt"])
            metadata.write(json.dumps({"file_name": f"images/{name}", "conditioning_image_file_name":
                                       f"conditioning/{name}", "text": record["prompt"]}) + "\n")
    shards = write_shards(PromptJsonSource(fill), root / "shards", shard_size=shard_size)
    return {"prompt_json": str(fill), "hf_disk": str(root / "hf_disk"), "parquet": str(root / "items.parquet"),
            "imagefolder": str(imagefolder), "folder": str(folder), "webdataset": shard_pattern(shards)}
