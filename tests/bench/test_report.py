"""The generated benchmark report from a quick run: the expected sections and rows, charts that are
valid PNGs, and a rerun that replaces its own block and keeps the hand-written rest."""

import struct

from fastmerge.bench.report import BEGIN, END, run_report
from fastmerge.cli import main


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_quick_report_sections_charts_and_rerun(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nHand-written notes that must survive.\n")
    run_report(str(results), quick=True, repeats=1)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nHand-written notes that must survive.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    for section in ("## Merge quality", "### digits: MLP 32-32", "| direct average |", "| permute |", "| CCA |",
                    "| parents (mean) / ensemble |", "## Speed", "| combine 2 models", "| count_nonfinite", "| TIES thresholds",
                    "| activation statistics",
                    "| permute rows and columns", "| float64 sum of 3 float32", "![merge quality](quality.png)", "![speed ratios](speed.png)"):
        assert section in text, section
    for chart in ("quality.png", "speed.png"):
        width, height = png_size(tmp_path / chart)
        assert 400 <= width <= 4000 and 200 <= height <= 3000
    # the quality rows are real merges: alignment beats the direct average of models from different seeds
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    accuracy = {name: float(rows[name].split("|")[2].split("±")[0]) for name in ("direct average", "permute", "CCA")}
    assert accuracy["permute"] > accuracy["direct average"] + 20 and accuracy["CCA"] > accuracy["direct average"] + 20

    results.write_text(results.read_text() + "\nA note added after the block.\n")
    assert main(["bench", "--report", str(results), "--quick", "--repeats", "1"]) == 0
    again = results.read_text()
    assert again.count(BEGIN) == 1 and "Hand-written notes that must survive." in again
    assert "A note added after the block." in again and "## Merge quality" in again
