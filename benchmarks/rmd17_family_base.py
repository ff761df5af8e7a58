"""A base that has seen the target's chemical family, but never the target: continue training a
shipped base on the *other* rMD17 molecules (their train splits, PBE/def2-SVP), holding one
molecule out whole; then `benchmarks/rmd17.py --base OUT --molecules TARGET --n 50` measures
few-shot fine-tuning on the held-out molecule against MACE trained from scratch on the same N.

    python benchmarks/rmd17_family_base.py --target naphthalene --per-molecule 250 --base chno-mf \
        --out runs/chno-mf+rmd17-no-naphthalene [--epochs E] [--max-minutes M]

The question it answers: is the few-shot gap to MACE (issue 15) a network problem or a base-data
problem? chno-mf saw PBE/def2-SVP only for <= 4 heavy atoms and ethanol; no aromatic ring at that
level. The continued training uses `mfcalc.finetune.finetune` with the existing PBE/def2-SVP
fidelity (its protocol for the data size; no replay of the base's other data, so this model is a
probe for the PBE fidelity, not a model to ship). Writes OUT (model.pt, checkpoint.pt,
finetune.json) and OUT/family_base.json (data, settings, minutes, the command).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from rmd17 import FIDELITY, MOLECULES, load

from mfcalc.finetune import finetune, save_finetuned


def family_data(target: str, per_molecule: int) -> tuple:
    """Each other molecule's first ``per_molecule`` training frames, chosen as rmd17.py chooses
    them (ethanol is skipped: its shared split is the one the base already trained on)."""
    others = [m for m in MOLECULES if m not in (target, "ethanol")]
    return others, [s for m in others for s in load(m, per_molecule)[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=[m for m in MOLECULES if m != "ethanol"])
    parser.add_argument("--per-molecule", type=int, default=250)
    parser.add_argument("--base", default="chno-mf")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, help="default: the fine-tuning protocol's for the data size")
    parser.add_argument("--max-minutes", type=float)
    args = parser.parse_args()

    others, data = family_data(args.target, args.per_molecule)
    print(f"continued training of {args.base} on {len(data)} PBE/def2-SVP frames of {', '.join(others)} "
          f"({args.target} held out)", flush=True)
    start = time.perf_counter()
    result = finetune(args.base, data, FIDELITY, setting_overrides={"epochs": args.epochs, "max_minutes": args.max_minutes},
                      log=lambda *a: print(*a, flush=True))
    minutes = (time.perf_counter() - start) / 60
    save_finetuned(result, args.out)
    record = {
        "base": args.base, "target_held_out": args.target, "molecules": others, "per_molecule": args.per_molecule,
        "frames": len(data), "fidelity": FIDELITY, "minutes": round(minutes, 1),
        "epochs_run": result.report.get("epochs_run"), "best_epoch": result.report.get("best_epoch"),
        "settings": result.report.get("settings"), "command": "python benchmarks/rmd17_family_base.py " + " ".join(sys.argv[1:]),
    }
    (Path(args.out) / "family_base.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
