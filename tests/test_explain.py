"""tools/explain.py: the 665 px box at stride 32, worked out by hand."""
import subprocess
import sys
from pathlib import Path

import pytest

from roikit.analysis.explain import explain_axis, explain_box, format_explanation

ROOT = Path(__file__).resolve().parents[1]


def test_integer_rounding_of_the_665px_box():
    e = explain_axis("integer", 0, 665, 32, 7)
    assert e.bins == [(2.0 * i, 2.0 * i + 2) for i in range(7)]  # 20.78 -> 20 cells, 2.86 -> 2 per bin
    assert e.cells_read == 14 and abs(e.box_cells - 20.78125) < 1e-9
    # bin i covers pixels [64 i, 64 i + 64): centre 64 i + 32; the true bin centre is (i + 0.5) 665 / 7
    assert e.centre_error_px == pytest.approx([64 * i + 32 - (i + 0.5) * 95 for i in range(7)])
    text = format_explanation([e])
    assert "665 / 32 = 20.78 cells -> floor = 20 cells" in text
    assert "20 / 7 = 2.86 cells -> floor = 2 cells" in text
    assert "14 cells = 448 px of the box's 665 px" in text


def test_torchvision_rounding_of_the_665px_box():
    e = explain_axis("torchvision", 0, 665, 32, 7)
    assert e.cells_read == 22  # round(20.78) = 21, + 1 = 22 cells
    assert e.bins[0] == (0.0, 4.0) and e.bins[-1] == (18.0, 22.0)  # ceil(3.14) = 4; floor(6 * 3.14) = 18


def test_samplers_centre_errors():
    aligned = explain_axis("roi_align", 0, 665, 32, 7)
    unaligned = explain_axis("roi_align_unaligned", 0, 665, 32, 7)
    assert aligned.centre_error_px == pytest.approx([0.0] * 7, abs=1e-9)
    assert unaligned.centre_error_px == pytest.approx([16.0] * 7)  # half a 32 px cell
    assert explain_axis("prroi_pool", 0, 665, 32, 7).centre_error_px == pytest.approx([16.0] * 7)


def test_y_axis_only_when_it_differs():
    assert len(explain_box((0, 0, 665, 665), 32)) == 5
    assert [e.axis for e in explain_box((0, 0, 300, 100), 16, rules=["integer"])] == ["x", "y"]


def test_bad_input():
    with pytest.raises(ValueError, match="x2 > x1"):
        explain_axis("integer", 10, 10, 32)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        explain_axis("integer", 0, 10, 0)
    with pytest.raises(ValueError, match="rule must be one of"):
        explain_axis("nearest", 0, 10, 32)


def test_cli_prints_the_example_and_rejects_bad_input():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "explain.py")], capture_output=True, text=True)
    assert run.returncode == 0 and "448 px of the box's 665 px" in run.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "explain.py"), "--box", "5", "5", "1", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("explain: ") and len(bad.stderr.strip().splitlines()) == 1
