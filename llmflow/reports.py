"""Where benchmarks and evaluations leave their results: a JSON report, and a plot if asked."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def write_report(
    report: Any,
    json_path: str,
    plot_path: str | None = None,
    draw: Callable[[Path], None] | None = None,
) -> None:
    """Write `report` as indented JSON, and `draw` the plot when a path for it is given;
    say where each went."""
    target = Path(json_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}")
    if plot_path and draw is not None:
        draw(Path(plot_path))
        print(f"wrote {plot_path}")


@contextlib.contextmanager
def figure(target: Path | IO[bytes], *grid: int, dpi: int = 110, **options: Any) -> Iterator[Any]:
    """The axes of `plt.subplots(*grid, **options)`, drawn off-screen (no display here);
    the figure is laid out and saved to `target` as a PNG when the block ends, and closed
    either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, axes = plt.subplots(*grid, **options)
    try:
        yield axes
        drawn.tight_layout()
        drawn.savefig(target, format="png", dpi=dpi)
    finally:
        plt.close(drawn)


def print_rows(rows: Iterable[tuple[str, object]]) -> None:
    """A report's lines as an aligned two-column table."""
    listed = list(rows)
    width = max((len(name) for name, _ in listed), default=0)
    for name, value in listed:
        print(f"{name:<{width}}  {value}")
