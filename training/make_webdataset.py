"""Write a data set of any layout this project reads as WebDataset tar shards, for streaming at scale.

Each item becomes `KEY.<suffix>` (the target's bytes as stored: png, jpg and webp are copied, other formats
re-encoded to PNG), `KEY.hint.<suffix>` (the hint, when the layout has one) and `KEY.txt` (the caption), KEY being
the item's number. Shards are written whole or not at all (into a folder that appears only when complete), with
`--shard_size` items each; `--shuffle` writes the items in a seeded random order, since a stream shuffles shards,
not the items within one (see `training/streaming.py`).

Usage::

    python training/make_webdataset.py ./training/fill50k --out ./training/fill50k_shards --shard_size 1000 --shuffle
    python tutorial_train.py --data './training/fill50k_shards/shard-{00000..00049}.tar' ...
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from cldm.checkpoint import atomic_folder
from ldm.errors import DEBUG_HELP, InputError, command_line
from training.images import HINT_MATTE, TARGET_MATTE, ImageSource, decode_image, encode_png, stored_suffix
from training.order import epoch_permutation
from training.sources import FORMATS, Columns, ItemSource, open_source

SHARD_PREFIX = "shard"


def _stored(image: ImageSource, matte: int) -> tuple[bytes, str]:
    """The bytes and suffix a shard stores an image under: as it is where shards can hold it, else PNG."""
    suffix = stored_suffix(image)
    if suffix is not None:
        return (image if isinstance(image, bytes) else Path(image).read_bytes()), suffix
    return encode_png(decode_image(image, matte)), "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same items give the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(source: ItemSource, out: str | Path, shard_size: int = 1000, order: Sequence[int] | None = None
                 ) -> list[Path]:
    """Write `source`'s items (in `order`, default as listed) as shards of `shard_size` items into the new folder
    `out`; returns the shard paths."""
    if shard_size < 1:
        raise InputError(f"--shard_size must be at least 1, got {shard_size}")
    order = list(range(len(source))) if order is None else list(order)
    width = max(5, len(str(max(len(order) - 1, 0) // shard_size)))
    names: list[str] = []

    def fill(folder: Path) -> None:
        for first in range(0, len(order), shard_size):
            name = f"{SHARD_PREFIX}-{first // shard_size:0{width}d}.tar"
            with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for index in order[first:first + shard_size]:
                    item, key = source.encoded(index), f"{index:08d}"
                    data, suffix = _stored(item.target, TARGET_MATTE)
                    _add(tar, f"{key}.{suffix}", data)
                    if item.hint is not None:
                        data, suffix = _stored(item.hint, HINT_MATTE)
                        _add(tar, f"{key}.hint.{suffix}", data)
                    _add(tar, f"{key}.txt", item.caption.encode("utf-8"))
            names.append(name)

    folder = atomic_folder(out, fill)
    return [folder / name for name in names]


def shard_pattern(shards: Sequence[Path]) -> str:
    """The brace pattern naming `shards` (as written by `write_shards`), for `--data`."""
    first, last = shards[0].stem.split("-")[-1], shards[-1].stem.split("-")[-1]
    return str(shards[0].parent / f"{SHARD_PREFIX}-{{{first}..{last}}}.tar") if len(shards) > 1 else str(shards[0])


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("data", help="a data set of any layout tutorial_train.py reads (see docs/train.md)")
    parser.add_argument("--out", required=True, help="new folder for the shards")
    parser.add_argument("--data_format", choices=[f for f in FORMATS if f != "webdataset"], default=None)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--conditioning_image_column", default="conditioning_image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--conditioning_dir", default=None, help="hint folder of a kohya-style folder")
    parser.add_argument("--hints_optional", action="store_true",
                        help="also write items that have no hint (training then makes hints with --hint)")
    parser.add_argument("--shard_size", type=int, default=1000, help="items per shard")
    parser.add_argument("--shuffle", action="store_true", help="write the items in a random order (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_bad", action="store_true", help="leave out unusable items (listed) instead of failing")
    args = parser.parse_args(argv)
    source = open_source(args.data, args.data_format,
                         Columns(args.image_column, args.conditioning_image_column, args.caption_column),
                         args.conditioning_dir, args.skip_bad, need_hints=not args.hints_optional)
    for bad in source.skipped:
        print(f"skipped: {bad.file}{f':{bad.line}' if bad.line else ''}: {bad.reason}", file=sys.stderr)
    order = epoch_permutation(len(source), args.seed, 0) if args.shuffle else None
    shards = write_shards(source, args.out, args.shard_size, order)
    print(f"wrote {len(source)} items ({len(source.skipped)} skipped) in {len(shards)} shards: "
          f"--data '{shard_pattern(shards)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
