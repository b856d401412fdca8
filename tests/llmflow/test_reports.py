"""Reports: the JSON, and figures drawn off-screen, saved and always closed."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from llmflow.reports import figure

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_figure_is_saved_as_png_when_its_block_ends_and_closed(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    with figure(target, 1, 2, figsize=(4, 2)) as axes:
        axes[0].plot([0, 1], [1, 2])
        assert not target.exists()
    assert target.read_bytes().startswith(PNG)
    assert plt.get_fignums() == []


def test_a_figure_whose_drawing_failed_is_closed_and_not_saved(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    with pytest.raises(ValueError), figure(target) as axes:
        axes.plot([0, 1], [1, 2])
        raise ValueError("bad data")
    assert not target.exists() and plt.get_fignums() == []
