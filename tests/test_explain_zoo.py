"""tools/explain.py on the zoo's region ops: ps_roi_pool and ps_roi_align against torchvision's own gradients,
roi_align_rotated against roi_align (angle 0) and against hand reasoning (90 degrees), deform_roi_pool against
roi_align on a moved box; hand-computed cells."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from roikit.analysis.explain import explain_axis, explain_box, explain_rotated, format_explanation

ROOT = Path(__file__).resolve().parents[1]


def tv_columns(op, lo, hi, stride, p):
    """torchvision's weight of each bin on each map column along x, [P, L], from its gradient: a map of P * P
    channels (bin (0, q) reads channel q), 8 rows (ps_roi_pool's forward never reads the last one), box y [0, 4 s)."""
    length = int(hi // stride) + 4
    feat = torch.zeros(1, p * p, 8, length, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, lo, 0.0, hi, 4.0 * stride]], dtype=torch.float64)
    out = op(feat, rois, p, 1.0 / stride)[0, 0, 0]  # [P]: the first row of bins
    rows = []
    for q in range(p):
        (g,) = torch.autograd.grad(out[q], feat, retain_graph=True)
        rows.append(g[0, q].sum(0))  # bin (0, q) reads channel q only
    return torch.stack(rows)


def cells_and_centres(weights, stride):
    """Each bin's [first, last + 1) cells and weighted centre in pixels."""
    centre = (torch.arange(weights.shape[1], dtype=torch.float64) + 0.5) * stride
    cells = [torch.nonzero(w > 1e-12).flatten().tolist() for w in weights]
    return ([(float(min(c)), float(max(c) + 1)) for c in cells],
            ((weights * centre).sum(1) / weights.sum(1)).tolist())


def ideal(lo, hi, p):
    return [lo + (i + 0.5) * (hi - lo) / p for i in range(p)]


# ------------------------------------------------------------------------------------------------ ps_roi_pool
def test_ps_roi_pool_of_the_665px_box_by_hand():
    # round(0) = 0, round(665 / 32 = 20.78) = 21: 21 - 0 = 21 cells (roi_pool's +1 would make 22), 3 per bin:
    # bin i reads [3i, 3i + 3), centre (3i + 1.5) 32 = 96i + 48 against the true 95i + 47.5: i + 0.5 px late.
    e = explain_axis("ps_roi_pool", 0, 665, 32, 7)
    assert e.bins == [(3.0 * i, 3.0 * i + 3) for i in range(7)]
    assert e.cells_read == 21
    assert e.centre_error_px == pytest.approx([i + 0.5 for i in range(7)])
    text = format_explanation([e])
    assert "size   21 - 0 = 21 cells (no +1, unlike roi_pool; at least 1)" in text
    assert "bin    21 / 7 = 3.00 cells" in text and "21 cells = 672 px of the box's 665 px (101.1%)" in text
    assert "input channel (c * 7 + p) * 7 + q (49 maps" in text


def test_ps_roi_pool_and_roi_pool_round_alike_but_count_differently():
    # A 100 px box at stride 32, 3 bins: both round 3.125 to 3. ps_roi_pool: 3 cells, bins [i, i + 1), centres
    # 16, 48, 80 px; roi_pool: 3 - 0 + 1 = 4 cells, bin 4/3: [0, 2), [1, 3), [2, 4), centres 32, 64, 96 px.
    ps = explain_axis("ps_roi_pool", 0, 100, 32, 3)
    rp = explain_axis("torchvision", 0, 100, 32, 3)
    assert ps.bins == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)] and rp.bins == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0)]
    truth = [100 / 6, 50, 500 / 6]
    assert ps.centre_error_px == pytest.approx([c - t for c, t in zip((16, 48, 80), truth)])
    assert rp.centre_error_px == pytest.approx([c - t for c, t in zip((32, 64, 96), truth)])
    # a box under one cell: extent max(round(0.59) - round(0.31), 1) = max(1 - 0, 1) = 1 cell, bins of 1/2
    assert explain_axis("ps_roi_pool", 10, 19, 32, 2).bins == [(0.0, 1.0), (0.0, 1.0)]


@pytest.mark.parametrize("lo,hi,stride,p", [(0, 665, 32, 7), (40, 260, 32, 7), (10.3, 99.7, 16, 3), (48, 80, 8, 5),
                                            (3, 5, 4, 7)])
def test_ps_ops_cells_and_centres_are_torchvisions(lo, hi, stride, p):
    for name, op in (("ps_roi_pool", torchvision.ops.ps_roi_pool),
                     ("ps_roi_align", lambda *a: torchvision.ops.ps_roi_align(*a, sampling_ratio=2))):
        e = explain_axis(name, lo, hi, stride, p)
        bins, centres = cells_and_centres(tv_columns(op, lo, hi, stride, p), stride)
        assert e.bins == bins, name
        assert [c + t for c, t in zip(e.centre_error_px, ideal(lo, hi, p))] == pytest.approx(centres), name


def test_ps_roi_align_is_roi_align_aligned():
    ps, ra = explain_axis("ps_roi_align", 10, 300, 16), explain_axis("roi_align", 10, 300, 16)
    assert ps.bins == ra.bins and ps.centre_error_px == pytest.approx(ra.centre_error_px)


# ------------------------------------------------------------------------------------------------ roi_align_rotated
@pytest.mark.parametrize("rotated,plain", [("roi_align_rotated", "roi_align"),
                                           ("roi_align_rotated_unaligned", "roi_align_unaligned")])
def test_rotated_at_angle_0_is_roi_align(rotated, plain):
    box = (10, 20, 300, 180)
    got, expected = explain_box(box, 16, rules=[rotated]), explain_box(box, 16, rules=[plain])
    assert [e.axis for e in got] == [e.axis for e in expected] == ["x", "y"]
    for g, e in zip(got, expected):
        assert g.bins == e.bins and g.cells_read == e.cells_read
        assert g.centre_error_px == pytest.approx(e.centre_error_px, abs=1e-9)
    assert len(explain_box((0, 0, 665, 665), 32, rules=[rotated])) == 1  # a square box at angle 0: x says it all


def test_rotated_at_90_degrees_swaps_the_axes():
    # Box x [100, 300), y [0, 400) turned 90 degrees counterclockwise about (200, 200): its width now runs up the
    # image (direction (0, -1)) over y [100, 300), its height to the right ((1, 0)) over x [0, 400). So its x axis
    # reads what roi_align's y axis reads of the box (0, 100, 400, 300), bins in reverse order (bin 0 at the
    # bottom) and errors negated (measured along (0, -1)); its y axis reads what roi_align's x axis reads.
    x, y = explain_rotated("roi_align_rotated", (100, 0, 300, 400), 32, angle=90)
    ax, ay = explain_box((0, 100, 400, 300), 32, rules=["roi_align"])
    assert x.bins == ay.bins[::-1] and y.bins == ax.bins
    assert x.centre_error_px == pytest.approx([-e for e in ay.centre_error_px[::-1]], abs=1e-9)
    assert y.centre_error_px == pytest.approx(ax.centre_error_px, abs=1e-9)
    assert "runs along (+0.00, -1.00)" in x.steps[1] and "rows (y)" in x.steps[1]
    # aligned=False: no -0.5 cell, so every sample is s / 2 = 16 px right and 16 px down on the image: -16 px
    # along the box's x axis (0, -1), +16 px along its y axis (1, 0).
    x, y = explain_rotated("roi_align_rotated_unaligned", (100, 0, 300, 400), 32, angle=90)
    assert x.centre_error_px == pytest.approx([-16.0] * 7) and y.centre_error_px == pytest.approx([16.0] * 7)


def test_rotated_at_30_degrees_keeps_its_bin_centres():
    # aligned: every column of bins is centred on its exact place along the turned axis (the map holds it all)
    for e in explain_rotated("roi_align_rotated", (100, 100, 300, 200), 16, angle=30):
        assert e.centre_error_px == pytest.approx([0.0] * 7, abs=1e-9)


def test_rotated_box_off_the_image_by_hand():
    # x [-64, 64) at stride 32, 2 bins of 2 cells, aligned: x1 = -2 - 0.5 cells, samples at -2, -1 | 0, 1. The one
    # at -2 lies outside [-1, W] and counts 0 (1 sample in 4 of every row); the one at -1 is clamped to cell 0. So
    # bin 0 is cell 0 alone: centre 16 px against the true -32 px (+48); bin 1 reads cells 0, 1: centre 32 px, exact.
    # y [0, 64): 2 bins of 1 cell, samples at -0.25 (clamped to cell 0), 0.25 | 0.75, 1.25: bin 0's centre is
    # (0.5 + 0.75 * 0.5 + 0.25 * 1.5) / 2 = 0.625 cells = 20 px against 16 (+4); bin 1 is exact.
    x, y = explain_rotated("roi_align_rotated", (-64, 0, 64, 64), 32, output_size=2, angle=0)
    assert x.centre_error_px == pytest.approx([48.0, 0.0]) and y.centre_error_px == pytest.approx([4.0, 0.0])
    assert x.bins == [(0.0, 1.0), (0.0, 2.0)] and y.bins == [(0.0, 2.0), (0.0, 3.0)]
    assert "25.0% of its samples land off the map and count 0" in x.steps[5]
    assert not any(step.startswith("edge") for step in explain_rotated("roi_align_rotated", (0, 0, 665, 665), 32,
                                                                        angle=180)[0].steps)


# ------------------------------------------------------------------------------------------------ deform_roi_pool
def test_deform_roi_pool_at_offset_0_is_roi_align_aligned():
    for box in ((0, 0, 665, 665), (10, 20, 300, 180)):
        for d, r in zip(explain_box(box, 32, rules=["deform_roi_pool"]), explain_box(box, 32, rules=["roi_align"])):
            assert d.bins == r.bins and d.centre_error_px == pytest.approx(r.centre_error_px)


def test_deform_offset_moves_every_bin_by_gamma_offset_size():
    # offset (0.5, -1), gamma 0.1, box 200 x 100 px: x moves by 0.1 * 0.5 * 200 = +10 px, y by 0.1 * -1 * 100 =
    # -10 px: the bins roi_align (aligned) reads of the box moved by that much, and every centre 10 px off.
    x, y = explain_box((100, 100, 300, 200), 16, rules=["deform_roi_pool"], offset=(0.5, -1))
    assert x.centre_error_px == pytest.approx([10.0] * 7) and y.centre_error_px == pytest.approx([-10.0] * 7)
    assert x.bins == explain_axis("roi_align", 110, 310, 16).bins
    assert y.bins == explain_axis("roi_align", 90, 190, 16).bins
    assert "+0.62 cells (+10.00 px)" in x.steps[1]


# ------------------------------------------------------------------------------------------------ bad input, CLI
def test_bad_input():
    box = (0, 0, 665, 665)
    with pytest.raises(ValueError, match="rules must be a list of names"):
        explain_box(box, 32, rules=["nearest"])
    with pytest.raises(ValueError, match="angle must be a finite number"):
        explain_box(box, 32, rules=["roi_align_rotated"], angle=float("nan"))
    with pytest.raises(ValueError, match="angle applies to roi_align_rotated"):
        explain_box(box, 32, angle=30)
    with pytest.raises(ValueError, match="offset applies to deform_roi_pool only"):
        explain_box(box, 32, offset=(1, 0))
    with pytest.raises(ValueError, match="offset must be a finite number"):
        explain_box(box, 32, rules=["deform_roi_pool"], offset=(float("inf"), 0))
    with pytest.raises(ValueError, match="turns the whole box"):
        explain_axis("roi_align_rotated", 0, 10, 32)
    with pytest.raises(ValueError, match="offset applies to deform_roi_pool only"):
        explain_axis("ps_roi_pool", 0, 10, 32, offset=1.0)
    with pytest.raises(ValueError, match="explain it at a larger stride"):  # a 10^5 px box at stride 1: 10^10 cells
        explain_rotated("roi_align_rotated", (0, 0, 1e5, 1e5), 1, angle=45)
    with pytest.raises(ValueError, match="explain_rotated explains"):
        explain_rotated("ps_roi_pool", box, 32)


def run_tool(capsys, *argv):
    spec = importlib.util.spec_from_file_location("explain_tool", ROOT / "tools" / "explain.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(tool.get_args_parser().parse_args(list(argv)))
    return code, capsys.readouterr()


def test_cli_explains_the_zoo_and_rejects_bad_angles(capsys):
    code, out = run_tool(capsys, "--rules", "ps_roi_pool", "ps_roi_align", "roi_align_rotated", "deform_roi_pool")
    assert code == 0 and out.out.count("[x axis]") == 4 and "21 - 0 = 21 cells (no +1" in out.out
    code, out = run_tool(capsys, "--rules", "roi_align_rotated", "--angle", "90", "--box", "100", "0", "300", "400")
    assert code == 0 and "turned 90 deg" in out.out and "[y axis]" in out.out
    code, out = run_tool(capsys, "--rules", "roi_align_rotated", "--angle", "nan")
    assert code == 2 and out.err == "explain: error: angle must be a finite number, got nan\n"
    code, out = run_tool(capsys, "--angle", "30")
    assert code == 2 and out.err.startswith("explain: error: angle applies to") and out.err.count("\n") == 1
