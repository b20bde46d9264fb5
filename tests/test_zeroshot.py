"""Zero-shot: lm-evaluation-harness on the in-memory model agrees with an independent plain-PyTorch scoring."""

import pyarrow as pa
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from qatlm.eval.zeroshot import PAPER_TASKS, average, evaluate_lm_eval, load_docs, requests, score_plain

# a handful of items per task, in the column layout of the local validation files (lists stored as text)
FIXTURES = {
    "piqa": [
        {"goal": "How do I ready a guinea pig cage?", "sol1": "Use paper strips.", "sol2": "Use jeans.", "label": "0"},
        {"goal": "How to open a door?", "sol1": "Turn the handle.", "sol2": "Sing to it.", "label": "0"},
        {"goal": "Keep a cat warm", "sol1": "Give it a roof.", "sol2": "Give it a mat.", "label": "1"},
    ],
    "arc_easy": [
        {"id": "a", "question": "Which technology was developed most recently?",
         "choices": "{'text': ['cellular telephone', 'television', 'refrigerator', 'airplane'], 'label': ['A', 'B', 'C', 'D']}", "answerKey": "A"},
        {"id": "b", "question": "What sat on the mat?", "choices": "{'text': ['the cat', 'a man', 'the door'], 'label': ['1', '2', '3']}", "answerKey": "1"},
    ],
    "arc_challenge": [
        {"id": "c", "question": "Who got the easier cases?", "choices": "{'text': ['Sarah', 'Maria'], 'label': ['A', 'B']}", "answerKey": "B"},
    ],
    "hellaswag": [
        {"ind": "1", "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "", "endings": "['is using wrap [title] to wrap skis.', 'starts pulling up roofing on a roof.', 'sat.', 'looked at the door.']",
         "source_id": "x", "split": "val", "split_type": "indomain", "label": "1"},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The cat sat on the mat because _ was warm.", "option1": "the cat", "option2": "the mat", "answer": "2"},
    ],
}


def write_stream(rows, path):
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("zs")
    return {t: load_docs(t, None, path=write_stream(rows, d / f"{t}.arrow")) for t, rows in FIXTURES.items()}


def test_prompts_follow_lm_eval_task_definitions(docs):
    from lm_eval.tasks.hellaswag.utils import preprocess

    h = docs["hellaswag"][0]
    assert h["query"] == preprocess("Roof shingle removal: A man is sitting on a roof. He")
    assert h["choices"][0] == preprocess("is using wrap [title] to wrap skis.") and h["gold"] == 1
    assert docs["piqa"][0]["query"] == "Question: How do I ready a guinea pig cage?\nAnswer:"
    assert docs["arc_easy"][1]["gold"] == 0 and docs["arc_challenge"][0]["gold"] == 1
    w = docs["winogrande"][0]
    assert requests(w) == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                           ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert w["gold"] == 1


def test_lm_eval_agrees_with_plain_pytorch(docs):
    torch.manual_seed(0)
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    harness = evaluate_lm_eval(model, tok, PAPER_TASKS, docs=docs, batch_size=2)
    for task in PAPER_TASKS:
        plain = score_plain(model, tok, task, docs[task])
        assert harness[task]["acc"] == pytest.approx(plain["acc"]), task
        if task != "winogrande":
            assert harness[task]["acc_norm"] == pytest.approx(plain["acc_norm"]), task
        assert harness[task]["n"] == len(FIXTURES[task])


def test_average_is_the_mean_accuracy_not_the_normalised_one():
    """A worked example (EfficientQAT's reported average: plain acc of each task, each task weighing the same
    whatever its size): (0.50 + 0.75 + 0.25) / 3 = 0.5, while acc_norm would give 0.9 and weighting by items 0.475."""
    results = {"piqa": {"acc": 0.50, "acc_norm": 0.9, "n": 10}, "arc_easy": {"acc": 0.75, "acc_norm": 0.9, "n": 4},
               "hellaswag": {"acc": 0.25, "acc_norm": 0.9, "n": 6}}
    assert average(results) == pytest.approx(0.5)


def test_plain_scores_respond_to_the_model(docs):
    """Not a constant: a model biased towards one answer's tokens picks that answer."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    doc = docs["piqa"][1]
    target = tok(" Sing to it.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.full((320,), -5.0))
        model.lm_head.bias[target] = 5.0
    assert score_plain(model, tok, "piqa", [doc])["acc"] == 0.0
