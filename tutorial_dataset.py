"""The tutorial's Fill50K data set, and a quick check that it loads.

As in the original ControlNet tutorial, ``MyDataset`` reads ``./training/fill50k/prompt.json``; all
validation and conversion lives in ``training.dataset.ControlDataset``.

    python tutorial_dataset.py [--root DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import DEBUG_HELP, MissingFileError, command_line
from training.dataset import ControlDataset

DEFAULT_ROOT = "./training/fill50k"
MAKE_COMMAND = "python training/make_fill50k.py --out {root} --n 50000 --size 512"


class MyDataset(ControlDataset):
    """Fill50K from its tutorial location; keyword options are those of ``ControlDataset``."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, **kwargs) -> None:
        super().__init__(root, **kwargs)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Print the data set's length and one item's prompt and array shapes; returns the exit status."""
    parser = argparse.ArgumentParser(description="Load the Fill50K tutorial data set and show one item.",
                                     epilog=DEBUG_HELP)
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"data set folder (default {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        raise MissingFileError(f"{args.root} not found; make it with: {MAKE_COMMAND.format(root=args.root)}")
    dataset = MyDataset(args.root)
    item = dataset[0]
    print(len(dataset))
    print(item["txt"])
    print(item["jpg"].shape)
    print(item["hint"].shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
