"""20 ps of Langevin NVT of ethanol at 500 K at CCSD(T) with the shipped model: every bond stays
in a sane range the whole time (the 100 ps run is benchmarks/md_stability.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
@pytest.mark.xfail(
    reason="known defect of ethanol-mf v1: its training data (MD17/rMD17/sGDML near equilibrium) never "
    "shows a stretched bond, it prices pulling an H off at ~0.6 eV instead of ~4.5 eV, and Langevin runs "
    "at 500 K lose a hydrogen after 10-20 ps. The fix (retraining with data/ethanol/"
    "ethanol_stretched_pbe_def2svp.xyz in the recipe) is the next step; this marker goes then.",
    strict=False,
)
def test_twenty_picoseconds_at_500_kelvin_keep_every_bond():
    from md_stability import run_stability

    report = run_stability(picoseconds=20.0, temperature=500.0, seed=0)
    assert report["intact"], report
    assert 350 < report["mean_temperature"] < 650
