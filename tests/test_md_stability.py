"""20 ps of Langevin NVT of ethanol at 500 K at CCSD(T) with the shipped model: every bond stays
in a sane range the whole time (the 100 ps run is benchmarks/md_stability.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_twenty_picoseconds_at_500_kelvin_keep_every_bond():
    from md_stability import run_stability

    report = run_stability(picoseconds=20.0, temperature=500.0, seed=0)
    assert report["intact"], report
    assert 350 < report["mean_temperature"] < 650
