"""Make a ready `prompt.json` training set from a folder of images: hints computed once, captions gathered.

    python training/prepare_dataset.py --images ./photos --hint canny --out ./training/photos_canny
    python training/prepare_dataset.py --images ./photos --hint hed --annotator_dir ./models/annotators \\
        --metadata ./photos/captions.jsonl --workers 2 --out ./training/photos_hed

For every image (any format OpenCV reads; grey, RGBA and 16-bit are converted as training converts them) it writes
`target/NAME.<suffix>` (the file's bytes, copied), `source/NAME.png` (the hint, the image's size) and a line of
`prompt.json`. The caption is `--prompt` when given, else the image's row in `--metadata` (a `.jsonl` of
`{"file_name", "text"}` objects or a `.csv` with those columns, as diffusers' image folders have), else its sidecar
file `NAME.txt` or `NAME.caption`. An image that cannot be read or has no caption is counted, listed on stderr and
in `OUT/skipped.txt`, never silently dropped. The folder appears only when complete.

Making hints here, once, costs what `tutorial_train.py --hint` would cost every epoch; use `--hint` while training
instead when hints should vary (`--random_thresholds`) or the data set is too large to copy.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from cldm.checkpoint import atomic_folder
from ldm.errors import DEBUG_HELP, InputError, MissingFileError, command_line
from training.hints import HintMaker
from training.images import TARGET_MATTE, ImageTooLarge, decode_image, image_size
from training.sources import CAPTION_SUFFIXES, IMAGE_SUFFIXES


@dataclass(frozen=True)
class Job:
    image: Path
    caption: str | None
    index: int


def read_metadata(path: Path) -> dict[str, str]:
    """File name -> caption from a `metadata.jsonl` / `.csv` (`file_name` and `text` fields)."""
    if not path.is_file():
        raise MissingFileError(f"{path}: metadata file not found")
    captions: dict[str, str] = {}
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for number, row in enumerate(rows, start=2):
            if "file_name" not in row or "text" not in row:
                raise InputError(f"{path}:{number}: needs the columns file_name and text")
            captions[Path(row["file_name"]).name] = row["text"]
        return captions
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or \
                not isinstance(row.get("text"), str):
            raise InputError(f'{path}:{number}: needs "file_name" and "text" strings')
        captions[Path(row["file_name"]).name] = row["text"]
    return captions


def gather(images: Path, prompt: str | None, metadata: dict[str, str] | None) -> tuple[list[Job], list[str]]:
    """The images to prepare with their captions, and the images left out for want of one (with why)."""
    if not images.is_dir():
        raise MissingFileError(f"{images}: image folder not found")
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    jobs, skipped = [], []
    for index, path in enumerate(files):
        caption = prompt
        if caption is None and metadata is not None:
            caption = metadata.get(path.name)
        if caption is None:
            sidecar = next((path.with_suffix(s) for s in CAPTION_SUFFIXES if path.with_suffix(s).is_file()), None)
            if sidecar is not None:
                try:
                    caption = sidecar.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as err:
                    skipped.append(f"{sidecar}: caption not readable ({err})")
                    continue
        if caption is None:
            skipped.append(f"{path}: no caption ({path.stem}.txt, a --metadata row, or --prompt)")
            continue
        jobs.append(Job(path, caption, index))
    return jobs, skipped


def _prepare(job: Job, maker: HintMaker, out: Path, seed: int) -> tuple[str | None, str | None]:
    """(prompt.json line, None) for a prepared image, (None, why) for one that cannot be read."""
    try:
        image_size(job.image)
        target = decode_image(job.image, TARGET_MATTE)
    except ImageTooLarge as err:
        return None, f"{job.image}: too large: {err}"
    except (OSError, ValueError) as err:
        return None, f"{job.image}: not a readable image ({str(err).splitlines()[0]})"
    hint = maker(target, np.random.default_rng([seed, 0, job.index]))
    name = f"{job.index:06d}_{job.image.stem}"
    target_name = f"target/{name}{job.image.suffix.lower()}"
    shutil.copyfile(job.image, out / target_name)
    if not cv2.imwrite(str(out / "source" / f"{name}.png"), cv2.cvtColor(hint, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out / 'source' / name}.png")
    return json.dumps({"source": f"source/{name}.png", "target": target_name, "prompt": job.caption}), None


def _prepare_all(args: tuple[list[Job], HintMaker, Path, int]) -> list[tuple[str | None, str | None]]:
    jobs, maker, out, seed = args
    return [_prepare(job, maker, out, seed) for job in jobs]


def prepare(jobs: list[Job], maker: HintMaker, out: Path, workers: int = 1, seed: int = 0,
            progress: bool = True) -> tuple[int, list[str]]:
    """Write the prepared set into the new folder `out`; (items written, images left out with why)."""
    lines: list[str] = []
    failed: list[str] = []

    def fill(folder: Path) -> None:
        (folder / "source").mkdir()
        (folder / "target").mkdir()
        tasks = [(jobs[i:i + 16], maker, folder, seed) for i in range(0, len(jobs), 16)]
        bar = tqdm(total=len(jobs), desc="hints", unit="img", disable=not progress)
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            for results in (pool.map(_prepare_all, tasks) if pool is not None else map(_prepare_all, tasks)):
                for line, why in results:
                    if line is not None:
                        lines.append(line)
                    else:
                        failed.append(why)  # type: ignore[arg-type]
                bar.update(len(results))
        bar.close()
        (folder / "prompt.json").write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    atomic_folder(out, fill)
    return len(lines), failed


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("--images", required=True, help="folder of images (the targets)")
    parser.add_argument("--hint", required=True, help="preprocessor: canny, hed, mlsd, scribble, normal, ...")
    parser.add_argument("--out", required=True, help="new folder for the prompt.json data set")
    parser.add_argument("--prompt", default=None, help="one caption for every image")
    parser.add_argument("--metadata", default=None, help="captions: metadata.jsonl or .csv (file_name, text)")
    parser.add_argument("--threshold_a", type=float, default=None, help="the preprocessor's first threshold")
    parser.add_argument("--threshold_b", type=float, default=None, help="the preprocessor's second threshold")
    parser.add_argument("--random_thresholds", action="store_true", help="canny: thresholds drawn per image")
    parser.add_argument("--annotator_dir", default=None, help="weights of the weight-file preprocessors")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random_thresholds")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    maker = HintMaker(args.hint, args.threshold_a, args.threshold_b, args.random_thresholds, args.annotator_dir)
    metadata = read_metadata(Path(args.metadata)) if args.metadata else None
    jobs, left_out = gather(Path(args.images), args.prompt, metadata)
    written, unreadable = prepare(jobs, maker, Path(args.out), args.workers, args.seed, progress=sys.stderr.isatty())
    skipped = left_out + unreadable
    if skipped:
        (Path(args.out) / "skipped.txt").write_text("".join(line + "\n" for line in skipped), encoding="utf-8")
        for line in skipped:
            print(f"skipped: {line}", file=sys.stderr)
    print(f"wrote {written} items to {Path(args.out) / 'prompt.json'} ({len(skipped)} skipped"
          f"{', listed in ' + str(Path(args.out) / 'skipped.txt') if skipped else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
