"""The embedded default model: a small byte-level Mamba-2 trained on the Python standard library,
shipped as package data so that the demo, the tests and the evaluation tools work offline.

See ``eval/train_embedded.py`` for how it is made and ``data/embedded/README.md`` for its card.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "embedded"
EMBEDDED_NAME = "embedded"


def embedded_model_path() -> Path:
    """Directory of the embedded model, loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``."""
    if not (EMBEDDED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from this installation ({EMBEDDED_DIR.name}/config.json); "
            "reinstall ssm_reduce or recreate it with `python eval/train_embedded.py`"
        )
    return EMBEDDED_DIR


def resolve_model_name(name: str) -> str:
    """``"embedded"`` -> the embedded model's directory; anything else unchanged."""
    return str(embedded_model_path()) if name == EMBEDDED_NAME else name
