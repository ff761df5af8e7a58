"""models/tools/compare_cards.py: the side-by-side table of two cards' test errors."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "tools"))

from compare_cards import table, held_out_kind  # noqa: E402


def _card(forces_a: float, energy_a: float, with_b: bool = True) -> dict:
    rows = [{"dataset": "a.extxyz", "fidelity": "CC", "n": 18, "energy_mae": energy_a, "forces_mae": forces_a}]
    if with_b:
        rows.append({"dataset": "b.npz", "fidelity": "MP2", "n": 200, "energy_mae": 0.001})
    return {
        "training_data": [
            {"path": "../data/a.extxyz", "fidelity": "CC", "split_by": "name"},
            {"path": "../data/b.npz", "fidelity": "MP2", "train": 400},
            {"path": "../data/c.npz", "fidelity": "MP2", "train": 0},
        ],
        "test_errors_by_dataset": rows,
    }


def test_each_test_set_is_labelled_by_what_was_held_out():
    kinds = held_out_kind(_card(0.1, 0.1))
    assert kinds[("a.extxyz", "CC")] == "held-out molecules"
    assert kinds[("b.npz", "MP2")] == "held-out frames"
    assert kinds[("c.npz", "MP2")] == "test-only molecule"


def test_rows_in_meV_best_in_bold_and_missing_rows_as_a_dash():
    text = table([_card(0.1569, 0.1096), _card(0.1411, 0.1200, with_b=False)], ["v6", "v7"])
    lines = text.splitlines()
    assert lines[0] == "| test set (card) | fidelity | n | v6 forces / energy | v7 forces / energy |"
    cc = next(line for line in lines if "a.extxyz" in line)
    assert "156.9 / **109.6**" in cc and "**141.1** / 120.0" in cc
    mp2 = next(line for line in lines if "b.npz" in line)
    assert mp2.endswith("| 200 | - / 1.0 | - / - |")  # only one card has it: nothing to compare, nothing in bold
    assert lines.index(cc) < lines.index(mp2)  # held-out molecules first


def test_command_line_writes_the_table(tmp_path):
    for name, forces in [("v6", 0.2), ("v7", 0.1)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps(_card(forces, 0.05)))
    out = tmp_path / "table.md"
    run = subprocess.run([sys.executable, str(ROOT / "models" / "tools" / "compare_cards.py"),
                          str(tmp_path / "v6"), str(tmp_path / "v7" / "card.json"), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "| v6 forces / energy | v7 forces / energy |" in out.read_text()
    assert "**100.0**" in out.read_text()
