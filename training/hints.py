"""Hints made from the target on the fly, with the same annotators generation uses (`cldm.annotators`).

`--hint canny` computes each item's hint from its (placed) target, so a folder of photos with captions is a
ControlNet training set as it is. `--random_thresholds` draws canny's two thresholds per item and epoch, as the
paper did for its Canny model (low in [50, 150], high in [low + 50, 250]); the draw comes from (seed, epoch, item),
so a run repeats and resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cldm.annotators import PREPROCESSORS, Preprocessor, get_preprocessor
from ldm.errors import InputError

RANDOM_LOW, RANDOM_HIGH_MAX, RANDOM_GAP = (50, 150), 250, (50, 150)


class HintMaker:
    """`maker(target_rgb_uint8, rng) -> hint_rgb_uint8` for one preprocessor and its settings."""

    def __init__(self, preprocessor: str, threshold_a: float | None = None, threshold_b: float | None = None,
                 random_thresholds: bool = False, annotator_dir: str | Path | None = None) -> None:
        if preprocessor not in PREPROCESSORS or preprocessor == "none":
            raise InputError(f"--hint must name a preprocessor ({', '.join(p for p in PREPROCESSORS if p != 'none')})"
                             f", got {preprocessor!r}")
        if random_thresholds and preprocessor != "canny":
            raise InputError("--random_thresholds draws canny's thresholds: it needs --hint canny")
        self.name = preprocessor
        self.threshold_a, self.threshold_b = threshold_a, threshold_b
        self.random_thresholds = random_thresholds
        self.annotator_dir = annotator_dir
        self._preprocessor: Preprocessor | None = None  # loaded in the process that uses it (DataLoader workers)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_preprocessor": None}

    @property
    def varies(self) -> bool:
        """Whether an item's hint differs between epochs."""
        return self.random_thresholds

    def thresholds(self, rng: np.random.Generator | None) -> tuple[float | None, float | None]:
        if not self.random_thresholds or rng is None:
            return self.threshold_a, self.threshold_b
        low = int(rng.integers(RANDOM_LOW[0], RANDOM_LOW[1] + 1))
        high = int(rng.integers(low + RANDOM_GAP[0], min(RANDOM_HIGH_MAX, low + RANDOM_GAP[1]) + 1))
        return float(low), float(high)

    def __call__(self, target: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        if self._preprocessor is None:
            self._preprocessor = get_preprocessor(self.name, self.annotator_dir, "cpu")
        low, high = self.thresholds(rng)
        hint = self._preprocessor(target, min(target.shape[:2]), low, high)
        if hint.shape[:2] != target.shape[:2]:  # annotators work at sizes rounded to 64: back to the target's
            hint = cv2.resize(hint, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_NEAREST)
        return hint
