"""Loads the embedded tasks' JSONL files from this folder, whatever the working directory."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def nextline(**kwargs):
    return _load("nextline")


def lastident(**kwargs):
    return _load("lastident")
