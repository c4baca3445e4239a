"""Document processing of the offline paper tasks, equal to lm-eval's own for these tasks."""

import re


def _clean_wikihow(text: str) -> str:
    # WikiHow-derived HellaSwag items carry "[title]"-style markup.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def convert(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean_wikihow(doc["activity_label"] + ": " + context),
            "choices": [_clean_wikihow(ending) for ending in doc["endings"]],
            "label": int(doc["label"]),
        }

    return dataset.map(convert)


# Winogrande is scored by partial evaluation: each option fills the blank to form a context, and the
# (shared) rest of the sentence after the blank is the continuation that is scored.
def winogrande_answer_index(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_contexts(doc) -> list:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
