"""The embedded default model: a small byte-level Mamba-2 trained on the Python standard library,
shipped as package data so that the demo, the tests and the evaluation tools work offline.

See ``eval/train_embedded.py`` for how it is made and ``data/embedded/README.md`` for its card.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "embedded"
EMBEDDED_NAME = "embedded"
# The embedded hybrid: Mamba-2 layers with two attention layers (Nemotron-H style), same corpus and split.
EMBEDDED_HYBRID_DIR = EMBEDDED_DIR.with_name("embedded-hybrid")
EMBEDDED_HYBRID_NAME = "embedded-hybrid"
EMBEDDED_NAMES = (EMBEDDED_NAME, EMBEDDED_HYBRID_NAME)
EOT_ID = 256  # byte-level vocabulary: ids 0-255 are bytes, 256 is <|endoftext|>
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
HELDOUT_BUCKETS = 20  # one file in twenty is held out


def stdlib_files() -> tuple[Path, list[str]]:
    """The running interpreter's standard-library root and its ``.py`` files (sorted relative POSIX
    paths; test suites and site-packages excluded) - the embedded model's corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        rels.append(rel.as_posix())
    return root, sorted(rels)


def is_heldout(rel: str) -> bool:
    """Whether a corpus file (relative path) is held out from training: decided by a hash of its path."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


def heldout_files() -> tuple[Path, list[str]]:
    root, rels = stdlib_files()
    return root, [r for r in rels if is_heldout(r)]


def training_texts(max_bytes: int | None = None) -> list[str]:
    """Texts of the training split of the corpus (for calibration), at most ``max_bytes`` in all."""
    root, rels = stdlib_files()
    texts, size = [], 0
    for rel in rels:
        if is_heldout(rel):
            continue
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if max_bytes is not None and size >= max_bytes:
            break
    return texts


def file_list_hash(rels: list[str]) -> str:
    return hashlib.sha256("\n".join(rels).encode()).hexdigest()


def embedded_model_path(name: str = EMBEDDED_NAME) -> Path:
    """Directory of the embedded model (``"embedded"``) or the embedded hybrid (``"embedded-hybrid"``),
    loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``."""
    if name not in EMBEDDED_NAMES:
        raise ValueError(f"name must be one of {', '.join(EMBEDDED_NAMES)}, got {name!r}")
    directory = EMBEDDED_DIR if name == EMBEDDED_NAME else EMBEDDED_HYBRID_DIR
    if not (directory / "config.json").is_file():
        arch = "" if name == EMBEDDED_NAME else " --arch hybrid"
        raise FileNotFoundError(
            f"the {name} model is missing from this installation ({directory.name}/config.json); "
            f"reinstall ssm_reduce or recreate it with `python eval/train_embedded.py{arch}`"
        )
    return directory


def resolve_model_name(name: str) -> str:
    """``"embedded"`` / ``"embedded-hybrid"`` -> that model's directory; anything else unchanged."""
    return str(embedded_model_path(name)) if name in EMBEDDED_NAMES else name


def byte_tokenizer():
    """Byte-level tokenizer: ids 0-255 are bytes, 256 is ``<|endoftext|>`` (also used for padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    byte_to_char, extra = {}, 0
    for b in range(256):
        if b in printable:
            byte_to_char[b] = chr(b)
        else:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = EOT_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=1 << 20,
    )
