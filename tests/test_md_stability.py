"""20 ps of Langevin NVT of ethanol at 500 K at CCSD(T) with the shipped model: every bond stays
in a sane range the whole time (the 100 ps run is benchmarks/md_stability.py). The run uses the
default force path, compile="auto", as a user's MD would: TorchScript first, then the compiled
graph once the background compilation has been checked; the test says which it ended on."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_twenty_picoseconds_at_500_kelvin_keep_every_bond():
    from md_stability import run_stability

    report = run_stability(picoseconds=20.0, temperature=500.0, seed=0, compile="auto")
    assert report["intact"], report
    assert report["compile_status"][9]["state"] in ("ready", "failed"), report  # it did try
    assert 350 < report["mean_temperature"] < 650
