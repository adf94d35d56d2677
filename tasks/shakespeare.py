"""The documents of tasks/shakespeare_val.yaml: the last tenth of input.txt (about its validation split), from the
first speech that starts there, one document per speech (blank-line separated)."""

import os


def validation_split(**metadata):
    import datasets

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "input.txt"), encoding="utf-8") as f:
        text = f.read()
    start = int(len(text) * 0.9)  # about where the token split falls; then to the next speech
    speeches = [s.strip("\n") for s in text[text.index("\n\n", start) :].split("\n\n") if s.strip()]
    return {"validation": datasets.Dataset.from_list([{"text": s} for s in speeches])}
