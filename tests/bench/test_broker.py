import argparse
import json
from pathlib import Path

import pytest

from bench.broker import Step, add_arguments, cpu_growth, run


def test_cpu_growth_is_the_last_steps_cost_over_the_firsts() -> None:
    steps = [Step(0, 0.5, 3.0), Step(1000, 0.8, 3.5), Step(2000, 1.5, 4.0)]
    assert cpu_growth(steps) == 3.0
    assert cpu_growth(steps[:1]) is None
    assert cpu_growth([Step(0, 0.0, 1.0), Step(10, 1.0, 1.0)]) is None


@pytest.mark.integration
def test_bench_broker_measures_each_step_on_a_real_tansu(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    report_path, plot_path = tmp_path / "broker.json", tmp_path / "broker.png"
    sizes = ["--rounds", "20", "--grow", "300", "--steps", "3"]
    args = parser.parse_args(
        ["--json", str(report_path), "--plot", str(plot_path), "--brokers", "tansu", *sizes]
    )
    assert run(args) == 0
    steps = json.loads(report_path.read_text())["brokers"]["tansu"]["steps"]
    assert [s["records"] for s in steps] == [20, 340, 660]
    assert all(s["round_trip_p50_ms"] > 0 and s["cpu_ms_per_round"] >= 0 for s in steps)
    assert plot_path.stat().st_size > 0
