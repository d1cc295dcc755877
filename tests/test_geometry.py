"""backend.geometry on real (synthetic, human-part-like) masks: exact corner outlines, specks, holes,
simplification bounds, the percent convention and the rasteriser everything is measured with."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend import geometry as G


def ellipse(h, w, cx, cy, a, b, angle=0.0):
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (cx, cy), (a, b), angle, 0, 360, 1, -1)
    return m.astype(bool)


def limb(h, w, pts, thickness):
    m = np.zeros((h, w), np.uint8)
    cv2.polylines(m, [np.array(pts, np.int32)], False, 1, thickness)
    return m.astype(bool)


def union_raster(rings, w, h):
    out = np.zeros((h, w), bool)
    for r in rings:
        out |= G.rasterise(r, w, h)
    return out


def shapes():
    h, w = 120, 160
    torso = ellipse(h, w, 80, 60, 40, 50)
    torso_with_arm = torso & ~limb(h, w, [(60, 50), (100, 70)], 9)       # arm crossing: a hole
    buttons = torso.copy()
    for y in (40, 60, 80):
        buttons[y:y + 3, 79:82] = False                                   # small holes
    split = ellipse(h, w, 30, 90, 15, 8) | ellipse(h, w, 120, 95, 14, 9)  # two shoes
    thin = limb(h, w, [(5, 5), (150, 100)], 1)                             # 1-pixel diagonal strap
    straight = np.zeros((h, w), bool)
    straight[50, 10:140] = True                                           # 1-pixel horizontal strap
    border = ellipse(h, w, 0, 0, 30, 25) | ellipse(h, w, w - 1, h - 1, 20, 20)
    full = np.ones((h, w), bool)
    return {"torso": torso, "torso_with_arm": torso_with_arm, "buttons": buttons, "split": split,
            "thin": thin, "straight": straight, "border": border, "full": full,
            "arm": limb(h, w, [(20, 20), (60, 50), (70, 100)], 11),
            "hair_ring": ellipse(h, w, 80, 60, 45, 45) & ~ellipse(h, w, 80, 66, 34, 38)}


@pytest.mark.parametrize("name", list(shapes()))
def test_exact_outline_rasterises_back_to_the_mask(name):
    mask = shapes()[name]
    h, w = mask.shape
    comps = G.trace_components(mask)
    rings = [c.outer for c in comps] + [hole for c in comps for hole in c.holes]
    assert np.array_equal(G.rasterise(rings, w, h), mask)
    assert sum(c.area for c in comps) == mask.sum()
    # The keyhole ring of each component alone is exact too: one ring per region, holes and all.
    assert np.array_equal(union_raster([G.bridge_holes(c.outer, c.holes) for c in comps], w, h), mask)


def test_exact_outline_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        comps = G.trace_components(mask)
        bridged = [G.bridge_holes(c.outer, c.holes) for c in comps]
        assert np.array_equal(union_raster(bridged, w, h), mask)
        for ring in bridged + G.mask_to_polygons(mask, 1.0, 1):
            # no zero-length edges: polygon editors choke on repeated consecutive points
            assert not np.any(np.all(ring == np.roll(ring, -1, axis=0), axis=1))


def test_single_pixel_is_the_square_on_its_corners():
    mask = np.zeros((10, 20), bool)
    mask[3, 7] = True                                  # row 3, col 7
    (ring,) = G.mask_to_polygons(mask, 1.0, 1)
    assert sorted(map(tuple, ring.tolist())) == [(7, 3), (7, 4), (8, 3), (8, 4)]
    pct = G.to_percent(ring, 20, 10)
    assert sorted(map(tuple, pct)) == [(35.0, 30.0), (35.0, 40.0), (40.0, 30.0), (40.0, 40.0)]


def test_full_image_spans_0_to_100_percent():
    mask = np.ones((37, 53), bool)
    (ring,) = G.mask_to_polygons(mask, 1.0, 1)
    pct = np.array(G.to_percent(ring, 53, 37))
    assert pct.min() == 0.0 and pct.max() == 100.0
    assert sorted(map(tuple, pct.tolist())) == [(0.0, 0.0), (0.0, 100.0), (100.0, 0.0), (100.0, 100.0)]


def test_percent_keeps_three_decimals_and_round_trips():
    ring = np.array([[1.0, 1.0], [1919.0, 3.0], [7.0, 1079.0]])
    pct = G.to_percent(ring, 1920, 1080, decimals=3)
    assert pct[1] == [99.948, 0.278]
    back = G.from_percent(pct, 1920, 1080)
    assert np.abs(back - ring).max() < 0.011        # 0.0005 % of 1920 px


def test_rasterise_samples_pixel_centres():
    # A square from 0.4 to 2.6 covers the centres 0.5, 1.5, 2.5: pixels 0..2, not 3.
    ring = np.array([[0.4, 0.4], [2.6, 0.4], [2.6, 2.6], [0.4, 2.6]])
    out = G.rasterise(ring, 5, 5)
    expected = np.zeros((5, 5), bool)
    expected[0:3, 0:3] = True
    assert np.array_equal(out, expected)
    # Just short of a centre: not covered.
    out = G.rasterise(np.array([[0.0, 0.0], [1.49, 0.0], [1.49, 1.0], [0.0, 1.0]]), 5, 5)
    assert out.sum() == 1


def test_one_ring_per_8_connected_component_largest_first():
    s = shapes()
    rings = G.mask_to_polygons(s["split"], 1.0, 16)
    assert len(rings) == 2
    assert abs(G.signed_area(rings[0])) >= abs(G.signed_area(rings[1]))
    # Pixels touching at a corner are one region (8-connectivity).
    diag = np.zeros((6, 6), bool)
    diag[1, 1] = diag[2, 2] = diag[3, 3] = True
    assert len(G.mask_to_polygons(diag, 1.0, 1)) == 1
    assert len(G.trace_components(diag)) == 1


def test_specks_below_min_pixels_are_dropped():
    mask = ellipse(100, 100, 50, 50, 20, 20)
    mask[5:7, 5:7] = True           # 4-pixel speck
    mask[90, 90] = True             # 1-pixel speck
    assert len(G.mask_to_polygons(mask, 1.0, 16)) == 1
    assert len(G.mask_to_polygons(mask, 1.0, 4)) == 2
    assert len(G.mask_to_polygons(mask, 1.0, 1)) == 3
    assert G.mask_to_polygons(np.zeros((10, 10), bool), 1.0, 1) == []


@pytest.mark.parametrize("name", ["torso", "torso_with_arm", "split", "border", "arm", "hair_ring", "full"])
def test_simplified_rings_stay_faithful(name):
    mask = shapes()[name]
    h, w = mask.shape
    floor = 0.95 if name == "hair_ring" else 0.97   # a 2-6 px wide crescent: the hardest case
    rings = G.mask_to_polygons(mask, 1.0, 16)
    assert G.iou(union_raster(rings, w, h), mask) >= floor
    # Read back from Label Studio's percent points: same fidelity.
    back = [G.from_percent(G.to_percent(r, w, h), w, h) for r in rings]
    assert G.iou(union_raster(back, w, h), mask) >= floor


def test_large_hole_is_cut_out_small_holes_are_filled():
    s = shapes()
    h, w = s["torso"].shape
    (ring,) = G.mask_to_polygons(s["torso_with_arm"], 1.0, 16)       # one ring, the arm cut out
    drawn = G.rasterise(ring, w, h)
    assert G.iou(drawn, s["torso_with_arm"]) >= 0.97
    assert G.iou(G.rasterise(G.simplify_ring(G.trace_components(s["torso_with_arm"])[0].outer, 1.0), w, h),
                 s["torso_with_arm"]) < 0.95          # filling the hole instead would cost > 5%
    (ring,) = G.mask_to_polygons(s["buttons"], 1.0, 16)              # 9-pixel buttons: filled
    assert G.rasterise(ring, w, h)[41, 80]
    (ring,) = G.mask_to_polygons(s["hair_ring"], 1.0, 16)            # hair around the face
    assert not G.rasterise(ring, w, h)[66, 80]
    assert G.iou(G.rasterise(ring, w, h), s["hair_ring"]) >= 0.95


def test_vertex_count_is_bounded_and_grows_with_detail():
    rng = np.random.default_rng(3)
    small = rng.random((30, 40)).astype(np.float32)
    field = cv2.resize(small, (800, 500), interpolation=cv2.INTER_CUBIC)
    wavy = field > 0.5                          # large part with a long, wavy outline
    assert sum(len(c.outer) for c in G.trace_components(wavy)) > 2000
    coarse = G.mask_to_polygons(wavy, 0.5, 16)
    normal = G.mask_to_polygons(wavy, 1.0, 16)
    fine = G.mask_to_polygons(wavy, 3.0, 16)
    assert max(len(r) for r in normal) <= G.vertex_cap(1.0) == 200
    assert max(len(r) for r in fine) <= G.vertex_cap(3.0)
    assert sum(map(len, coarse)) < sum(map(len, normal)) < sum(map(len, fine))
    assert G.mask_to_polygons(wavy, 1.0, 16, max_vertices=12) and all(
        len(r) <= 12 for r in G.mask_to_polygons(wavy, 1.0, 16, max_vertices=12))


def test_tolerance_grows_with_size_so_small_parts_survive():
    assert G.ring_tolerance(20, 1.0) < G.ring_tolerance(200_000, 1.0)
    assert G.ring_tolerance(200_000, 2.0) == pytest.approx(G.ring_tolerance(200_000, 1.0) / 2)
    small = ellipse(40, 40, 20, 20, 3, 2)         # ~20-pixel part: sunglasses far away
    (ring,) = G.mask_to_polygons(small, 1.0, 16)
    assert len(ring) >= 4
    assert G.iou(G.rasterise(ring, 40, 40), small) >= 0.8


def test_thin_parts_keep_a_region():
    s = shapes()
    h, w = s["thin"].shape
    for name in ("thin", "straight"):
        rings = G.mask_to_polygons(s[name], 1.0, 16)
        assert len(rings) == 1 and 3 <= len(rings[0]) <= 200
    (ring,) = G.mask_to_polygons(s["straight"], 1.0, 16)
    assert np.array_equal(G.rasterise(ring, w, h), s["straight"])


def test_masks_touching_the_border_stay_inside_the_image():
    mask = shapes()["border"]
    h, w = mask.shape
    for ring in G.mask_to_polygons(mask, 1.0, 16):
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= w
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= h
        pct = np.array(G.to_percent(ring, w, h))
        assert pct.min() >= 0 and pct.max() <= 100
    xs = np.concatenate([r[:, 0] for r in G.mask_to_polygons(mask, 1.0, 16)])
    assert xs.min() == 0 and xs.max() == w     # the outline runs along the image edges


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D"):
        G.mask_to_polygons(np.zeros((2, 2, 3), bool), 1.0, 1)
    with pytest.raises(ValueError, match="detail"):
        G.mask_to_polygons(np.ones((4, 4), bool), 0.0, 1)
    with pytest.raises(ValueError, match="image size"):
        G.to_percent(np.zeros((3, 2)), 0, 10)
