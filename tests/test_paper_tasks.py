"""The offline copies of the paper's six lm-eval tasks load local JSONL and match lm-eval's own."""

import importlib.util
import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "eval" / "tasks" / "paper"

DOCS = {
    "lambada_openai": [{"text": "the cat sat on the mat and then the cat"}, {"text": "one two three four"}],
    "hellaswag": [
        {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he then [title] fries them",
         "endings": ["in a pan.", "on the roof.", "with  a [step] spoon.", "quickly."], "label": "0"},
        {"activity_label": "Sports", "ctx_a": "A girl runs.", "ctx_b": "she", "endings": ["jumps.", "sits.", "eats.", "sleeps."],
         "label": "2"},
    ],
    "piqa": [{"goal": "open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0}],
    "arc_easy": [{"question": "What is H2O?", "choices": {"text": ["water", "salt"], "label": ["A", "B"]}, "answerKey": "A"}],
    "arc_challenge": [{"question": "2+2?", "choices": {"text": ["3", "4", "5"], "label": ["1", "2", "3"]}, "answerKey": "2"}],
    "winogrande": [{"sentence": "The trophy did not fit in the case because _ was too big.", "option1": "the trophy",
                    "option2": "the case", "answer": "1"}],
}


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_processing_equals_lm_eval_own():
    import datasets

    ours = _module(PAPER / "utils.py", "paper_task_utils")
    lm_dir = Path(lm_eval.__file__).parent / "tasks"
    theirs_hs = _module(lm_dir / "hellaswag" / "utils.py", "lm_eval_hellaswag_utils")
    theirs_wg = _module(lm_dir / "winogrande" / "preprocess_winogrande.py", "lm_eval_winogrande_utils")
    data = datasets.Dataset.from_list(DOCS["hellaswag"])
    a, b = ours.hellaswag_docs(data), theirs_hs.process_docs(data)
    for x, y in zip(a, b):
        assert x["query"] == y["query"] and x["choices"] == y["choices"] and x["label"] == y["gold"]
    doc = DOCS["winogrande"][0]
    assert ours.winogrande_answer_index(doc) == theirs_wg.doc_to_text(doc)
    assert ours.winogrande_continuation(doc) == theirs_wg.doc_to_target(doc)
    assert ours.winogrande_contexts(doc) == theirs_wg.doc_to_choice(doc)


def test_all_six_run_from_local_files(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ssm_reduce.embedded import byte_tokenizer

    from .conftest import tiny_mamba2

    data = tmp_path / "eval" / "tasks" / "paper" / "data"
    data.mkdir(parents=True)
    for task, docs in DOCS.items():
        (data / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_mamba2(layers=2, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=byte_tokenizer(), batch_size=4, device="cpu"),
        tasks=["offline_paper"],
        task_manager=TaskManager(include_path=str(PAPER), include_defaults=False),
        bootstrap_iters=0,
    )
    names = {f"offline_{t}" for t in DOCS}
    assert names <= set(results["results"])
    assert "acc,none" in results["results"]["offline_piqa"]
    assert "perplexity,none" in results["results"]["offline_lambada_openai"]
