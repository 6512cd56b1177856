"""OpenPose body maps: the CMU body-pose network, PAF grouping, and the 18-keypoint drawing.

Keypoints come from the original annotator's ``body_pose_model.pth`` (the CMU COCO body model:
VGG19 front end, then 6 two-branch stages predicting 38 part-affinity-field channels and 19
heatmaps). MediaPipe is not used: ``import mediapipe`` fails in this environment (its native
bindings do not initialise), so it cannot serve as a weight-free keypoint source here.

Keypoint order (OpenPose COCO-18): 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist,
5 l-shoulder, 6 l-elbow, 7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee,
13 l-ankle, 14 r-eye, 15 l-eye, 16 r-ear, 17 l-ear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from cldm.annotators.base import annotator_dir, as_device, prepare_input, require_file
from cldm.checkpoint import CheckpointError, load_state_dict
from ldm.errors import one_line

BODY_POSE_FILENAME = "body_pose_model.pth"
NUM_KEYPOINTS = 18

# Limbs as 1-based keypoint pairs, in the OpenPose order; the last two (ear-shoulder) are used
# for grouping only and are not drawn.
LIMB_SEQUENCE: tuple[tuple[int, int], ...] = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
    (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18),
)  # fmt: skip
NUM_DRAWN_LIMBS = 17
# PAF (x, y) channel pairs of each limb, indexed into the 38 PAF channels
PAF_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
# RGB colours: limb k and keypoint k share colour k (limbs drawn at 60% brightness)
POSE_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# VGG19-based front end: (name, in, out, kernel); 2x2 max-pool after the listed layers
BACKBONE_LAYERS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3),
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
)  # fmt: skip
BACKBONE_POOL_AFTER = frozenset({"conv1_2", "conv2_2", "conv3_4"})
LIMB_STICK_WIDTH = 4
JOINT_RADIUS = 4

Keypoint = tuple[float, float] | None


def draw_bodypose(canvas: np.ndarray, people: Sequence[Sequence[Keypoint]]) -> np.ndarray:
    """Draw OpenPose skeletons onto an RGB uint8 ``canvas`` (in place; also returned).

    ``people`` holds, per person, 18 keypoints as normalised ``(x, y)`` in [0, 1] (x over width)
    or ``None`` when missing. Limbs are filled ellipses of half-width 4 px along the segment in
    ``0.6 * colour``; joints are filled circles of radius 4 px in full colour, drawn after all limbs
    (the ControlNet 1.1 style the openpose models were trained on).
    """
    h, w = canvas.shape[:2]
    for person in people:
        for (a, b), color in zip(LIMB_SEQUENCE[:NUM_DRAWN_LIMBS], POSE_COLORS, strict=False):
            p, q = person[a - 1], person[b - 1]
            if p is None or q is None:
                continue
            xs = np.array([p[0], q[0]]) * float(w)
            ys = np.array([p[1], q[1]]) * float(h)
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            center = (int(xs.mean()), int(ys.mean()))
            poly = cv2.ellipse2Poly(center, (int(length / 2), LIMB_STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in color])
    for person in people:
        for point, color in zip(person, POSE_COLORS, strict=False):
            if point is None:
                continue
            cv2.circle(canvas, (int(point[0] * w), int(point[1] * h)), JOINT_RADIUS, color, thickness=-1)
    return canvas


class NamedConvStack(nn.ModuleDict):
    """Convs keyed by their original names, each followed by ReLU (optionally not the last).

    Keeping the original layer names as module keys makes the checkpoint mapping a plain rename.
    """

    def __init__(
        self,
        spec: Sequence[tuple[str, int, int, int]],
        last_relu: bool,
        pool_after: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__({name: nn.Conv2d(cin, cout, k, padding=k // 2) for name, cin, cout, k in spec})
        self.last_relu = last_relu
        self.pool_after = pool_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = list(self.keys())
        for i, name in enumerate(names):
            x = self[name](x)
            if i < len(names) - 1 or self.last_relu:
                x = torch.relu(x)
            if name in self.pool_after:
                x = nn.functional.max_pool2d(x, 2, 2)
        return x


class BodyPoseNet(nn.Module):
    """The CMU body model with the original layer names (``conv1_1`` ... ``Mconv7_stage6_L2``).

    Branch ``L1`` predicts 38 PAF channels, ``L2`` 19 heatmaps (18 parts + background); each
    later stage sees both previous outputs concatenated with the 128-channel backbone features.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = NamedConvStack(BACKBONE_LAYERS, last_relu=True, pool_after=BACKBONE_POOL_AFTER)
        self.stages = nn.ModuleList()
        for stage in range(1, 7):
            branches = nn.ModuleDict()
            for branch, n_out in (("L1", 38), ("L2", 19)):
                if stage == 1:
                    spec = [(f"conv5_{i}_CPM_{branch}", 128, 128, 3) for i in (1, 2, 3)]
                    spec += [(f"conv5_4_CPM_{branch}", 128, 512, 1), (f"conv5_5_CPM_{branch}", 512, n_out, 1)]
                else:
                    spec = [(f"Mconv1_stage{stage}_{branch}", 185, 128, 7)]
                    spec += [(f"Mconv{i}_stage{stage}_{branch}", 128, 128, 7) for i in (2, 3, 4, 5)]
                    spec += [
                        (f"Mconv6_stage{stage}_{branch}", 128, 128, 1),
                        (f"Mconv7_stage{stage}_{branch}", 128, n_out, 1),
                    ]
                branches[branch] = NamedConvStack(spec, last_relu=False)
            self.stages.append(branches)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(paf (B,38,H/8,W/8), heatmap (B,19,H/8,W/8))`` from ``BGR / 256 - 0.5`` input."""
        features = self.backbone(x)
        h = features
        paf = heat = features
        for branches in self.stages:
            paf = branches["L1"](h)
            heat = branches["L2"](h)
            h = torch.cat([paf, heat, features], dim=1)
        return paf, heat

    def load_original_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the original flat keys (``conv1_1.weight``); prefixed keys are accepted too."""
        by_layer = {".".join(k.split(".")[-2:]): k for k in self.state_dict()}
        mapped = {}
        for key, value in state.items():
            short = ".".join(key.split(".")[-2:])
            if short not in by_layer:
                raise KeyError(f"unexpected key {key!r} in body pose weights")
            mapped[by_layer[short]] = value
        self.load_state_dict(mapped, strict=True)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the original flat key names, as stored in ``body_pose_model.pth``."""
        return {".".join(k.split(".")[-2:]): v for k, v in self.state_dict().items()}


def _find_peaks(heatmaps: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Per part, local maxima ``(x, y, score, id)`` of the Gaussian-smoothed (sigma 3) heatmap."""
    peaks_per_part = []
    next_id = 0
    for part in range(NUM_KEYPOINTS):
        raw = heatmaps[:, :, part]
        smooth = cv2.GaussianBlur(raw, (25, 25), 3.0)
        padded = np.pad(smooth, 1)
        center = padded[1:-1, 1:-1]
        is_peak = (
            (center >= padded[1:-1, :-2])
            & (center >= padded[1:-1, 2:])
            & (center >= padded[:-2, 1:-1])
            & (center >= padded[2:, 1:-1])
            & (center > threshold)
        )
        ys, xs = np.nonzero(is_peak)
        ids = np.arange(next_id, next_id + len(xs))
        next_id += len(xs)
        peaks_per_part.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64))
    return peaks_per_part


def _connect_limbs(
    peaks: list[np.ndarray], paf: np.ndarray, image_height: int, paf_threshold: float = 0.05
) -> list[np.ndarray]:
    """Per limb, greedy PAF matching: rows ``(id_a, id_b, score, i_a, i_b)``.

    A candidate pair is scored by sampling the PAF at 10 points along the segment; it needs >80%
    of samples above ``paf_threshold`` and a positive mean score after a penalty for limbs longer
    than half the image height.
    """
    n_samples = 10
    connections = []
    for (a, b), (cx, cy) in zip(LIMB_SEQUENCE, PAF_CHANNELS, strict=True):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        found = np.zeros((0, 5))
        if len(cand_a) and len(cand_b):
            scored = []
            for i, pa in enumerate(cand_a):
                for j, pb in enumerate(cand_b):
                    vec = pb[:2] - pa[:2]
                    norm = max(0.001, float(np.hypot(vec[0], vec[1])))
                    vec = vec / norm
                    xs = np.rint(np.linspace(pa[0], pb[0], n_samples)).astype(int)
                    ys = np.rint(np.linspace(pa[1], pb[1], n_samples)).astype(int)
                    along = paf[ys, xs, cx] * vec[0] + paf[ys, xs, cy] * vec[1]
                    score = float(along.mean()) + min(0.5 * image_height / norm - 1.0, 0.0)
                    if np.count_nonzero(along > paf_threshold) > 0.8 * n_samples and score > 0:
                        scored.append((i, j, score))
            scored.sort(key=lambda s: s[2], reverse=True)
            used_a: set[int] = set()
            used_b: set[int] = set()
            rows = []
            for i, j, score in scored:
                if i in used_a or j in used_b:
                    continue
                rows.append([cand_a[i][3], cand_b[j][3], score, i, j])
                used_a.add(i)
                used_b.add(j)
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
            if rows:
                found = np.array(rows)
        connections.append(found)
    return connections


def _group_people(peaks: list[np.ndarray], connections: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Assemble limbs into people; returns ``(candidates (N,4), people (P,20))``.

    Person rows hold a candidate id per keypoint (-1 missing), then total score and part count;
    people with fewer than 4 parts or mean score below 0.4 are dropped, as in OpenPose.
    """
    candidates = np.concatenate(peaks, axis=0)  # ids are row indices: they were numbered in order
    people = np.zeros((0, NUM_KEYPOINTS + 2))
    for k, (a, b) in enumerate(LIMB_SEQUENCE):
        conn = connections[k]
        ia, ib = a - 1, b - 1
        for row in conn:
            id_a, id_b, score = row[0], row[1], row[2]
            owners = [p for p in range(len(people)) if people[p][ia] == id_a or people[p][ib] == id_b]
            if len(owners) == 1:
                p = owners[0]
                if people[p][ib] != id_b:
                    people[p][ib] = id_b
                    people[p][-1] += 1
                    people[p][-2] += candidates[int(id_b), 2] + score
            elif len(owners) >= 2:
                p1, p2 = owners[0], owners[1]
                overlap = ((people[p1] >= 0).astype(int) + (people[p2] >= 0).astype(int))[:-2]
                if not np.any(overlap == 2):
                    people[p1][:-2] += people[p2][:-2] + 1
                    people[p1][-2:] += people[p2][-2:]
                    people[p1][-2] += score
                    people = np.delete(people, p2, axis=0)
                else:
                    people[p1][ib] = id_b
                    people[p1][-1] += 1
                    people[p1][-2] += candidates[int(id_b), 2] + score
            elif not owners and k < 17:
                new = -np.ones(NUM_KEYPOINTS + 2)
                new[ia], new[ib] = id_a, id_b
                new[-1] = 2
                new[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, new])
    keep = (people[:, -1] >= 4) & (people[:, -2] / np.maximum(people[:, -1], 1) >= 0.4)
    return candidates, people[keep]


def keypoints_from_maps(heatmaps: np.ndarray, pafs: np.ndarray, heatmap_threshold: float = 0.1) -> list[list[Keypoint]]:
    """Group part heatmaps ``(H, W, >=18)`` and PAFs ``(H, W, 38)`` into people.

    Returns one list of 18 normalised ``(x, y)`` keypoints per person (``None`` where missing).
    """
    h, w = heatmaps.shape[:2]
    peaks = _find_peaks(heatmaps.astype(np.float32), heatmap_threshold)
    connections = _connect_limbs(peaks, pafs, h)
    candidates, people = _group_people(peaks, connections)
    result: list[list[Keypoint]] = []
    for person in people:
        points: list[Keypoint] = []
        for idx in person[:NUM_KEYPOINTS]:
            if idx < 0:
                points.append(None)
            else:
                cx, cy = candidates[int(idx), :2]
                points.append((float(cx) / w, float(cy) / h))
        result.append(points)
    return result


class OpenposeDetector:
    """Body keypoints with the original CMU model, drawn as an OpenPose map.

    Args:
        model_dir: folder with ``body_pose_model.pth`` (default ``<repo>/models/annotators``).
        device: torch device (default CPU).
        heatmap_threshold: minimum part confidence for a keypoint candidate (original: 0.1).
        net_input_height: height the image is scaled to for the network; the ControlNet 1.1
            annotator runs one scale, 0.5 x OpenPose's 368-px box = 184.
    """

    STRIDE = 8
    PAD_VALUE = 128

    def __init__(
        self,
        model_dir: Path | str | None = None,
        device: torch.device | str | None = None,
        heatmap_threshold: float = 0.1,
        net_input_height: int = 184,
    ) -> None:
        self.model_dir = annotator_dir(model_dir)
        self.device = as_device(device)
        self.heatmap_threshold = heatmap_threshold
        self.net_input_height = net_input_height
        self._net: BodyPoseNet | None = None

    def net(self) -> BodyPoseNet:
        """The network, loaded on first use."""
        if self._net is None:
            path = require_file(self.model_dir, BODY_POSE_FILENAME, "OpenPose body model")
            net = BodyPoseNet()
            try:
                net.load_original_state_dict(load_state_dict(path))
            except (KeyError, RuntimeError) as err:
                raise CheckpointError(f"{path}: not the original OpenPose body model ({one_line(err)})") from err
            self._net = net.eval().to(self.device)
        return self._net

    def _maps(self, img_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps ``(H, W, 19)`` and PAFs ``(H, W, 38)`` at the image's size."""
        h, w = img_rgb.shape[:2]
        bgr = np.ascontiguousarray(img_rgb[:, :, ::-1])
        scale = self.net_input_height / h
        scaled = cv2.resize(bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        sh, sw = scaled.shape[:2]
        pad_h, pad_w = (-sh) % self.STRIDE, (-sw) % self.STRIDE
        padded = cv2.copyMakeBorder(scaled, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(self.PAD_VALUE,) * 3)
        x = torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 256.0 - 0.5
        with torch.inference_mode():
            paf, heat = self.net()(x.to(self.device))

        def upsample(t: torch.Tensor) -> np.ndarray:
            m = t[0].float().cpu().numpy().transpose(1, 2, 0)
            m = cv2.resize(m, (0, 0), fx=self.STRIDE, fy=self.STRIDE, interpolation=cv2.INTER_CUBIC)
            m = m[:sh, :sw]
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_CUBIC)
            return m.reshape(h, w, -1)

        return upsample(heat), upsample(paf)

    def detect(self, img_rgb: np.ndarray) -> list[list[Keypoint]]:
        """People as lists of 18 normalised ``(x, y)`` keypoints (``None`` where not found)."""
        heat, paf = self._maps(img_rgb)
        return keypoints_from_maps(heat, paf, self.heatmap_threshold)

    def __call__(self, img: np.ndarray, resolution: int = 512) -> np.ndarray:
        """OpenPose body map (skeletons on black, RGB uint8) at the working resolution."""
        rgb = prepare_input(img, resolution)
        canvas = np.zeros_like(rgb)
        return draw_bodypose(canvas, self.detect(rgb))
