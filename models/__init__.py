"""The shipped models, installed as package data ``mfcalc.models``: one folder per model holding
its exported ``model.pt`` and its card (``README.md``).

In a checkout this is the top-level ``models/`` folder, where training also writes its
checkpoints and logs (not installed); in a wheel only ``*/model.pt`` and ``*/README.md`` are
shipped. Models are found by name with ``mfcalc.modelfile.resolve_model_path``.
"""
