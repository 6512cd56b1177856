"""Where training items come from: one thin reader per layout users bring, each over the library made for it.

| layout (`--data_format`) | what PATH is |
|---|---|
| `prompt_json` | a folder with `prompt.json` (a `{"source", "target", "prompt"}` object per line): Fill50K's |
| `hf_disk` | a Hugging Face `datasets` folder written by `save_to_disk` |
| `parquet`, `arrow` | a parquet / arrow file, or a folder of them (`datasets`) |
| `imagefolder` | an image folder with `metadata.jsonl` or `metadata.csv` (diffusers' `train_controlnet.py` format) |
| `folder` | kohya's: `images/NAME.png` with `images/NAME.txt` (or `.caption`) beside it, hints in `conditioning/` |
| `webdataset` | tar shards, streamed (see `training/streaming.py`) |

`detect_format` picks the layout from PATH. The `datasets` layouts read the columns `image`, `conditioning_image` and
`text` by default (`Columns`, renamed as diffusers' `--image_column` etc.); nothing is ever fetched from a hub.

Every source validates what it can before training (every row or line is parsed and every image header read), and a
problem is a `DatasetError` naming the file and line, row or key, or, with `skip_bad`, a `BadLine` counted and
reported. A source's items have `target` and `hint` (or None: made on the fly with `--hint`) as uint8 RGB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import UnidentifiedImageError

from ldm.errors import InputError, MissingFileError, UserError
from training.images import HINT_MATTE, TARGET_MATTE, ImageSource, ImageTooLarge, decode_image, image_size

FORMATS = ("prompt_json", "hf_disk", "parquet", "arrow", "imagefolder", "folder", "webdataset")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
REQUIRED_KEYS = ("source", "target", "prompt")


class DatasetError(UserError, ValueError):
    """A problem with the data set's files, reported as one line naming the file (and line, row or key)."""


class BadLine(NamedTuple):
    """An item that was skipped: its line or row (1-based where it has one), the file at fault, and why."""

    line: int
    file: str
    reason: str


@dataclass(frozen=True)
class RawItem:
    target: np.ndarray
    hint: np.ndarray | None
    caption: str


@dataclass(frozen=True)
class EncodedItem:
    """An item's images as stored (file paths or encoded bytes, not decoded) and its caption: what shards copy."""

    target: ImageSource
    hint: ImageSource | None
    caption: str


@dataclass(frozen=True)
class Columns:
    """The `datasets` columns holding the target image, the hint image and the caption."""

    image: str = "image"
    conditioning_image: str = "conditioning_image"
    caption: str = "text"


class ItemSource(Protocol):
    """What `training.dataset.PairedDataset` reads items from."""

    description: str
    #: What one item is called in messages: lines, rows, images.
    unit: str
    skipped: list[BadLine]

    def __len__(self) -> int: ...
    def where(self, index: int) -> str: ...
    def caption(self, index: int) -> str: ...
    def size(self, index: int) -> tuple[int, int]: ...
    def identity(self, index: int) -> str: ...
    def load(self, index: int) -> RawItem: ...
    def encoded(self, index: int) -> EncodedItem: ...


def detect_format(path: Path) -> str:
    """The layout of PATH (see the module docstring)."""
    text = str(path)
    if "{" in text or path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    if not path.exists():
        raise MissingFileError(f"{path}: data not found (a folder, a file, or tar shards like "
                               "data/{00000..00009}.tar)")
    if path.is_file():
        if path.suffix in (".parquet", ".arrow"):
            return path.suffix[1:]
        raise DatasetError(f"{path}: not a data set layout this project reads (expected a folder, a .parquet or "
                           ".arrow file, or .tar shards)")
    if (path / "prompt.json").is_file():
        return "prompt_json"
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf_disk"
    if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
        return "imagefolder"
    if any(path.glob("*.parquet")):
        return "parquet"
    if any(path.glob("*.arrow")):
        return "arrow"
    images = path / "images" if (path / "images").is_dir() else path
    if any(p.suffix in CAPTION_SUFFIXES for p in images.iterdir()):
        return "folder"
    raise DatasetError(f"{path}: cannot tell its layout (no prompt.json, datasets files, metadata.jsonl, .txt captions "
                       f"or .tar shards): pass --data_format, one of {', '.join(FORMATS)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_image(source: ImageSource, what: str) -> tuple[tuple[int, int] | None, str | None]:
    """(size, None) for a readable image header, else (None, why not)."""
    try:
        return image_size(source), None
    except ImageTooLarge as err:
        return None, f"{what} is too large: {err}"
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return None, f"{what} is not a readable image ({_first_line(err)})"


class _Validated:
    """Shared by the map-style sources: the skip-or-raise rule and the hash of a target's bytes."""

    description = ""
    unit = "items"
    skip_bad = False

    def _bad(self, line: int, file: str, reason: str, where: str) -> None:
        if not self.skip_bad:
            raise DatasetError(f"{where}: {reason}")
        self.skipped.append(BadLine(line, file, reason))


# ----- prompt.json ---------------------------------------------------------------------------------------------
class _Record(NamedTuple):
    line: int
    source: Path
    target: Path
    prompt: str
    size: tuple[int, int]


class PromptJsonSource(_Validated):
    """`root/prompt.json`: one JSON object per line, `{"source": ..., "target": ..., "prompt": ...}`, image paths
    relative to `root`; both images must exist, be readable and have the same size."""

    unit = "lines"

    def __init__(self, root: str | Path, skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.prompt_path = self.root / "prompt.json"
        self.description = str(self.prompt_path)
        self.skip_bad = skip_bad
        self.skipped: list[BadLine] = []
        self.records: list[_Record] = []
        try:
            raw = self.prompt_path.read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{self.prompt_path}: not found") from None
        except OSError as exc:
            raise DatasetError(f"{self.prompt_path}: cannot read ({exc.strerror})") from None
        for number, raw_line in enumerate(raw.splitlines(), start=1):
            if raw_line.strip():  # blank lines (e.g. a trailing one) are ignored
                record = self._parse(number, raw_line)
                if record is not None:
                    self.records.append(record)

    def _parse(self, number: int, raw_line: bytes) -> _Record | None:
        where = f"{self.prompt_path}:{number}"
        try:
            entry = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            return self._bad(number, str(self.prompt_path), "not valid UTF-8", where)
        except json.JSONDecodeError as exc:
            return self._bad(number, str(self.prompt_path), f"not valid JSON ({exc.msg} at column {exc.colno})", where)
        if not isinstance(entry, dict):
            return self._bad(number, str(self.prompt_path), f"expected a JSON object, got {type(entry).__name__}",
                             where)
        for key in REQUIRED_KEYS:
            if key not in entry:
                return self._bad(number, str(self.prompt_path), f'missing key "{key}"', where)
            if not isinstance(entry[key], str):
                return self._bad(number, str(self.prompt_path),
                                 f'"{key}" must be a string, got {type(entry[key]).__name__}', where)
        sizes = {}
        for key in ("source", "target"):
            name = entry[key]
            path = self.root / name
            if not path.is_file():
                return self._bad(number, str(path), f"{key} image {name} not found", where)
            sizes[key], problem = _check_image(path, f"{key} image {name}")
            if problem:
                return self._bad(number, str(path), problem, where)
        if sizes["source"] != sizes["target"]:
            (sw, sh), (tw, th) = sizes["source"], sizes["target"]
            return self._bad(number, str(self.root / entry["source"]), f"source image {entry['source']} is {sw}x{sh} "
                             f"but target image {entry['target']} is {tw}x{th}", where)
        return _Record(number, self.root / entry["source"], self.root / entry["target"], entry["prompt"],
                       sizes["target"])

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        return f"{self.prompt_path}:{self.records[index].line}"

    def first_line_of(self, index: int) -> str:
        return f"line {self.records[index].line}"

    def caption(self, index: int) -> str:
        return self.records[index].prompt

    def size(self, index: int) -> tuple[int, int]:
        return self.records[index].size

    def identity(self, index: int) -> str:
        from cldm.checkpoint import file_sha256

        return file_sha256(self.records[index].target)

    def target_path(self, index: int) -> Path:
        return self.records[index].target

    def _decode(self, index: int, path: Path, matte: int) -> np.ndarray:
        try:
            return decode_image(path, matte)
        except ValueError as err:
            raise DatasetError(f"{self.where(index)}: {_first_line(err)} {path}") from None

    def load_hint(self, index: int) -> np.ndarray:
        return self._decode(index, self.records[index].source, HINT_MATTE)

    def load(self, index: int) -> RawItem:
        record = self.records[index]
        return RawItem(self._decode(index, record.target, TARGET_MATTE), self.load_hint(index), record.prompt)

    def encoded(self, index: int) -> EncodedItem:
        record = self.records[index]
        return EncodedItem(record.target, record.source, record.prompt)


# ----- Hugging Face datasets --------------------------------------------------------------------------------------
def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError("this data layout needs the datasets package: pip install datasets") from None
    return datasets


def _image_bytes(value: Any, base: Path) -> ImageSource | None:
    """The encoded image a `datasets` cell holds: undecoded `{bytes, path}`, a path string, or nothing."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, str):
        path = Path(value)
        return path if path.is_absolute() else base / path
    if isinstance(value, bytes):
        return value
    raise ValueError(f"an image cell of type {type(value).__name__}")


class DatasetsSource(_Validated):
    """A Hugging Face `datasets` table on disk: `save_to_disk` folders, parquet/arrow files, image folders with a
    metadata file. Images are read undecoded and decoded here, as every other layout's are."""

    unit = "rows"

    def __init__(self, path: Path, data_format: str, columns: Columns | None = None, skip_bad: bool = False,
                 need_hints: bool = True) -> None:
        datasets = _require_datasets()
        columns = columns or Columns()
        self.path, self.description, self.skip_bad, self.columns = path, f"{path} ({data_format})", skip_bad, columns
        self.skipped: list[BadLine] = []
        table = self._open(datasets, path, data_format)
        wanted = [columns.image, columns.caption] + ([columns.conditioning_image] if need_hints else [])
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise DatasetError(f"{self.description}: no column {', '.join(repr(c) for c in missing)}; it has "
                               f"{', '.join(table.column_names)} (rename with --image_column, "
                               "--conditioning_image_column, --caption_column)")
        self.has_hints = columns.conditioning_image in table.column_names
        for column in (columns.image, columns.conditioning_image):
            if column in table.column_names and isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        self.table = table
        self.base = path if path.is_dir() else path.parent
        self.rows: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        for row in range(len(table)):
            size = self._validate(row)
            if size is not None:
                self.rows.append(row)
                self.sizes.append(size)

    @staticmethod
    def _open(datasets: Any, path: Path, data_format: str) -> Any:
        try:
            if data_format == "hf_disk":
                table = datasets.load_from_disk(str(path))
            elif data_format == "imagefolder":
                table = datasets.load_dataset("imagefolder", data_dir=str(path))
            else:
                files = sorted(str(p) for p in path.glob(f"*.{data_format}")) if path.is_dir() else [str(path)]
                table = datasets.load_dataset(data_format, data_files=files)
        except Exception as err:  # reading the user's files: any failure means they are not what they claim
            raise DatasetError(f"{path}: not a readable {data_format} data set ({_first_line(err)})") from err
        if isinstance(table, datasets.DatasetDict):
            if not table:
                raise DatasetError(f"{path}: holds no split")
            table = table["train"] if "train" in table else table[next(iter(table))]
        return table

    def _validate(self, row: int) -> tuple[int, int] | None:
        where = f"{self.description} row {row}"
        cells = self.table[row]
        caption = cells[self.columns.caption]
        if caption is None or not isinstance(caption, str):
            return self._bad(row, self.description, f"column {self.columns.caption!r} is not text", where)
        sizes = {}
        for column in (self.columns.image, self.columns.conditioning_image):
            if column not in cells:
                continue
            try:
                image = _image_bytes(cells[column], self.base)
            except ValueError as err:
                return self._bad(row, self.description, f"column {column!r} holds {err}", where)
            if image is None:
                return self._bad(row, self.description, f"column {column!r} has no image", where)
            sizes[column], problem = _check_image(image, f"column {column!r}")
            if problem:
                return self._bad(row, str(image) if isinstance(image, Path) else self.description, problem, where)
        hint_size = sizes.get(self.columns.conditioning_image)
        if hint_size is not None and hint_size != sizes[self.columns.image]:
            return self._bad(row, self.description, f"conditioning image is {hint_size[0]}x{hint_size[1]} but image "
                             f"is {sizes[self.columns.image][0]}x{sizes[self.columns.image][1]}", where)
        return sizes[self.columns.image]

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        return f"{self.description} row {self.rows[index]}"

    def first_line_of(self, index: int) -> str:
        return f"row {self.rows[index]}"

    def caption(self, index: int) -> str:
        return self.table[self.rows[index]][self.columns.caption]

    def size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def _image(self, index: int, column: str, matte: int) -> np.ndarray | None:
        cells = self.table[self.rows[index]]
        if column not in cells:
            return None
        try:
            return decode_image(_image_bytes(cells[column], self.base), matte)  # type: ignore[arg-type]
        except ValueError as err:
            raise DatasetError(f"{self.where(index)}: column {column!r}: {_first_line(err)}") from None

    def identity(self, index: int) -> str:
        image = _image_bytes(self.table[self.rows[index]][self.columns.image], self.base)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()  # type: ignore[arg-type]
        return hashlib.sha256(data).hexdigest()

    def load(self, index: int) -> RawItem:
        return RawItem(self._image(index, self.columns.image, TARGET_MATTE),  # type: ignore[arg-type]
                       self._image(index, self.columns.conditioning_image, HINT_MATTE), self.caption(index))

    def encoded(self, index: int) -> EncodedItem:
        cells = self.table[self.rows[index]]
        hint = cells.get(self.columns.conditioning_image)
        return EncodedItem(_image_bytes(cells[self.columns.image], self.base),  # type: ignore[arg-type]
                           None if hint is None else _image_bytes(hint, self.base), self.caption(index))


# ----- kohya-style folders ----------------------------------------------------------------------------------------
class FolderSource(_Validated):
    """`images/NAME.png` with its caption in `images/NAME.txt` (or `.caption`), hints in `conditioning/NAME.*`
    (or `conditioning_dir`); without hints, `--hint` makes them. Items in name order."""

    unit = "images"

    def __init__(self, path: Path, conditioning_dir: Path | None = None, skip_bad: bool = False,
                 need_hints: bool = True) -> None:
        self.path, self.skip_bad = path, skip_bad
        self.images_dir = path / "images" if (path / "images").is_dir() else path
        self.description = str(self.images_dir)
        hints_dir = conditioning_dir or path / "conditioning"
        self.hints_dir = hints_dir if hints_dir.is_dir() else None
        if need_hints and self.hints_dir is None:
            raise DatasetError(f"{hints_dir}: no hint folder (give --conditioning_dir, or make hints with --hint)")
        self.skipped: list[BadLine] = []
        files = sorted(p for p in self.images_dir.iterdir() if p.is_file())
        images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        captions = {p.stem: p for p in files if p.suffix in CAPTION_SUFFIXES}
        hints = ({p.stem: p for p in self.hints_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
                 if self.hints_dir else {})
        for stem in sorted(captions.keys() - images.keys()):
            self._bad(0, str(captions[stem]), f"caption {captions[stem].name} has no image", str(captions[stem]))
        for stem in sorted(hints.keys() - images.keys()):
            self._bad(0, str(hints[stem]), f"conditioning image {hints[stem].name} has no target image in "
                      f"{self.images_dir}", str(hints[stem]))
        self.items: list[tuple[Path, Path | None, str, tuple[int, int]]] = []
        for stem in sorted(images):
            item = self._validate(images[stem], captions.get(stem), hints.get(stem), need_hints)
            if item is not None:
                self.items.append(item)

    def _validate(self, image: Path, caption: Path | None, hint: Path | None, need_hints: bool
                  ) -> tuple[Path, Path | None, str, tuple[int, int]] | None:
        where = str(image)
        if caption is None:
            return self._bad(0, where, f"image {image.name} has no caption ({image.stem}.txt or .caption)", where)
        try:
            text = caption.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            return self._bad(0, str(caption), f"caption {caption.name} is not readable text ({_first_line(err)})",
                             str(caption))
        if need_hints and hint is None:
            return self._bad(0, where, f"image {image.name} has no conditioning image in {self.hints_dir}", where)
        size, problem = _check_image(image, f"image {image.name}")
        if problem:
            return self._bad(0, where, problem, where)
        if hint is not None:
            hint_size, problem = _check_image(hint, f"conditioning image {hint.name}")
            if problem:
                return self._bad(0, str(hint), problem, str(hint))
            if hint_size != size:
                return self._bad(0, str(hint), f"conditioning image {hint.name} is {hint_size[0]}x{hint_size[1]} but "
                                 f"image {image.name} is {size[0]}x{size[1]}", str(hint))
        return image, hint, text, size  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.items)

    def where(self, index: int) -> str:
        return str(self.items[index][0])

    def first_line_of(self, index: int) -> str:
        return self.items[index][0].name

    def caption(self, index: int) -> str:
        return self.items[index][2]

    def size(self, index: int) -> tuple[int, int]:
        return self.items[index][3]

    def identity(self, index: int) -> str:
        from cldm.checkpoint import file_sha256

        return file_sha256(self.items[index][0])

    def encoded(self, index: int) -> EncodedItem:
        image, hint, caption, _ = self.items[index]
        return EncodedItem(image, hint, caption)

    def load(self, index: int) -> RawItem:
        image, hint, caption, _ = self.items[index]
        try:
            return RawItem(decode_image(image, TARGET_MATTE), None if hint is None else decode_image(hint, HINT_MATTE),
                           caption)
        except ValueError as err:
            raise DatasetError(f"{self.where(index)}: {_first_line(err)}") from None


def open_source(path: str | Path, data_format: str | None = None, columns: Columns | None = None,
                conditioning_dir: str | Path | None = None, skip_bad: bool = False, need_hints: bool = True
                ) -> ItemSource:
    """The map-style source of PATH's layout (`data_format`, or detected); `need_hints` False when hints are made
    on the fly. Streamed shards are opened by `training.streaming.ShardStream` instead."""
    path = Path(path)
    data_format = data_format or detect_format(path)
    if data_format not in FORMATS:
        raise InputError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
    if data_format == "webdataset":
        raise InputError("tar shards are streamed: open them with training.streaming.ShardStream")
    if not path.exists():
        raise MissingFileError(f"{path}: data not found")
    if data_format == "prompt_json":
        return PromptJsonSource(path, skip_bad)
    if data_format == "folder":
        return FolderSource(path, None if conditioning_dir is None else Path(conditioning_dir), skip_bad, need_hints)
    return DatasetsSource(path, data_format, columns or Columns(), skip_bad, need_hints)


def first_of_each_size(source: ItemSource, indices: Sequence[int]) -> dict[tuple[int, int], int]:
    """Each distinct target size and the first item that has it."""
    first: dict[tuple[int, int], int] = {}
    for index in indices:
        first.setdefault(source.size(index), index)
    return first
