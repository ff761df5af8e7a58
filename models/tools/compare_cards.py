"""Two or more trained models side by side on their cards' own test sets: forces MAE (meV/Å) and
energy MAE (meV) of every (dataset, fidelity) row of ``test_errors_by_dataset``, labelled by what the
test frames are: molecules held out whole (a dataset split by molecule name), a molecule seen only
at test time (``train: 0``), or new frames of molecules the model trained on.

    python models/tools/compare_cards.py models/chno-mf/card.json runs/chno-mf-v7/card.json \
        [--names v6 v7] [--out table.md]

Cards must come from the same recipe family (same test sets); a row missing from one card is shown
as "-". The best value of each row is in bold.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple


def _as_list(value):
    """Cards written by older versions hold some entries as their Python repr."""
    if isinstance(value, str):
        import ast

        return ast.literal_eval(value)
    return value


def held_out_kind(card: dict) -> Dict[Tuple[str, str], str]:
    """(dataset file name, fidelity) -> 'held-out molecules' / 'test-only molecule' / 'held-out frames'."""
    kinds = {}
    for entry in _as_list(card.get("training_data", [])):
        name = Path(entry["path"]).name
        if entry.get("split_by") == "name":
            kind = "held-out molecules"
        elif entry.get("train") == 0:
            kind = "test-only molecule"
        else:
            kind = "held-out frames"
        kinds[(name, entry["fidelity"])] = kind
    return kinds


def rows(card: dict) -> Dict[Tuple[str, str], dict]:
    return {(r["dataset"], r["fidelity"]): r for r in _as_list(card["test_errors_by_dataset"])}


def _cell(values: List[float], k: int, fmt: str) -> str:
    value = values[k]
    if value is None:
        return "-"
    text = fmt.format(value)
    present = [v for v in values if v is not None]
    return f"**{text}**" if len(present) > 1 and value == min(present) else text


def table(cards: List[dict], names: List[str]) -> str:
    kinds = {}
    for card in cards:
        kinds.update(held_out_kind(card))
    per_card = [rows(card) for card in cards]
    keys = []
    for r in per_card:
        keys += [k for k in r if k not in keys]
    order = {"held-out molecules": 0, "test-only molecule": 1, "held-out frames": 2}
    keys.sort(key=lambda k: order.get(kinds.get(k, ""), 3))
    header = "| test set (card) | fidelity | n | " + " | ".join(f"{n} forces / energy" for n in names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for key in keys:
        found = [r.get(key) for r in per_card]
        n = next(r["n"] for r in found if r is not None)
        forces = [1000 * r["forces_mae"] if r is not None and "forces_mae" in r else None for r in found]
        energy = [1000 * r["energy_mae"] if r is not None else None for r in found]
        cells = [f"{_cell(forces, k, '{:.1f}')} / {_cell(energy, k, '{:.1f}')}" for k in range(len(cards))]
        label = f"{kinds.get(key, '?')}, `{key[0]}`"
        lines.append(f"| {label} | {key[1]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cards", nargs="+", help="card.json files (or the folders holding them)")
    parser.add_argument("--names", nargs="+", help="a column name per card (default: the folder names)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    paths = [Path(p) / "card.json" if Path(p).is_dir() else Path(p) for p in args.cards]
    names = args.names or [p.parent.name for p in paths]
    if len(names) != len(paths):
        parser.error(f"--names: {len(names)} names for {len(paths)} cards")
    text = table([json.loads(p.read_text()) for p in paths], names)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
