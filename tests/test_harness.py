import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import eval as eval_script
from checkpoint import save_checkpoint
from conftest import REPO
from data import windows
from evaluation import evaluate
from model import GPT, GPTConfig
from runtime import Runtime
from tokenizer import EOT_TOKEN, get_tokenizer

harness = pytest.importorskip("harness", exc_type=ImportError)  # needs lm-eval

TEXT = open(f"{REPO}/input.txt", encoding="utf-8").read()[:3000]


def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, SimpleNamespace(seed=1))
    return model


def test_the_harness_s_loglikelihood_of_a_text_is_eval_py_s_loss_on_the_same_windows(tmp_path):
    model, rt = tiny_checkpoint(tmp_path), Runtime("cpu", "cpu", torch.float32)
    lm = harness.HarnessModel(model, rt, seq_len=32, batch_size=4)
    [loglikelihood] = lm.loglikelihood_rolling([SimpleNamespace(args=(TEXT,))])
    tokens = [EOT_TOKEN] + get_tokenizer().encode_ordinary(TEXT)
    ours = evaluate(model, windows(tokens, 32, 4, None), rt)  # what eval.py computes over a split's windows
    assert ours["labels"] == len(tokens) - 1
    assert -loglikelihood / ours["labels"] == pytest.approx(ours["loss"], abs=1e-4)


def test_a_continuation_s_loglikelihood_and_greedy_flag_are_the_model_s(tmp_path):
    model, rt = tiny_checkpoint(tmp_path), Runtime("cpu", "cpu", torch.float32)
    lm = harness.HarnessModel(model, rt, seq_len=64, batch_size=4)
    context, continuation = "ROMEO:", " But soft"
    [(loglikelihood, greedy)] = lm.loglikelihood([SimpleNamespace(args=(context, continuation))])
    tokenizer = get_tokenizer()
    ids = tokenizer.encode_ordinary(context) + tokenizer.encode_ordinary(continuation)
    n = len(tokenizer.encode_ordinary(continuation))
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0]
    logprobs = torch.log_softmax(logits[0, -n:].float(), -1)
    expected = logprobs.gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()
    assert loglikelihood == pytest.approx(expected, abs=1e-4)
    assert greedy == (logits[0, -n:].argmax(-1).tolist() == ids[-n:])


def test_a_continuation_longer_than_the_context_counts_every_one_of_its_tokens(tmp_path):
    model, rt = tiny_checkpoint(tmp_path), Runtime("cpu", "cpu", torch.float32)  # a context of 64 tokens
    lm = harness.HarnessModel(model, rt, seq_len=64, batch_size=4)
    tokenizer = get_tokenizer()
    text = tokenizer.decode(tokenizer.encode_ordinary(TEXT)[:128])
    assert len(tokenizer.encode_ordinary(text)) == 128  # (the text of 128 tokens is those 128 tokens again)
    [(loglikelihood, _)] = lm.loglikelihood([SimpleNamespace(args=("", text))])
    # after an empty context (<|endoftext|>), 128 tokens: two whole windows, as the rolling loglikelihood takes them
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert loglikelihood == pytest.approx(rolling, abs=1e-3)


def test_an_empty_continuation_has_loglikelihood_zero_and_is_greedy(tmp_path):
    model, rt = tiny_checkpoint(tmp_path), Runtime("cpu", "cpu", torch.float32)
    lm = harness.HarnessModel(model, rt, seq_len=64, batch_size=4)
    assert lm.loglikelihood([SimpleNamespace(args=("A", "")), SimpleNamespace(args=("", ""))]) == [(0.0, True)] * 2


def test_generation_stops_at_a_stop_string_given_alone_as_at_the_same_in_a_list(tmp_path):
    model, rt = tiny_checkpoint(tmp_path), Runtime("cpu", "cpu", torch.float32)
    lm = harness.HarnessModel(model, rt, seq_len=64, batch_size=4)
    [text] = lm.generate_until([SimpleNamespace(args=("ROMEO:", {"max_gen_toks": 40}))])
    stop = text[0] + "\u2603"  # not in the text, but its first character is: read as characters, it cuts the text
    given_alone, in_a_list = lm.generate_until([SimpleNamespace(args=("ROMEO:", {"max_gen_toks": 40, "until": u}))
                                                for u in (stop, [stop])])
    assert given_alone == in_a_list == text != ""


def test_the_shipped_offline_task_runs_and_its_bits_per_byte_are_the_model_s(tmp_path, capsys, caplog):
    model = tiny_checkpoint(tmp_path)
    caplog.set_level("WARNING")
    eval_script.main(["--init_from", str(tmp_path), "--dataset_path", "none", "--tasks", "shakespeare_val", "--limit",
                      "3", "--device", "cpu", "--dtype", "float32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not [r for r in caplog.records if "aggregation" in r.getMessage()]  # the task file states each metric's
    saved = json.loads((tmp_path / "lm_eval.json").read_text())  # beside the checkpoint
    assert saved["shakespeare_val"]["bits_per_byte,none"] == pytest.approx(result["shakespeare_val_bits_per_byte"])
    # the same figure from the harness's own windows over the task's first 3 documents
    docs = harness_docs(3)
    lm = harness.HarnessModel(model, Runtime("cpu", "cpu", torch.float32), seq_len=64, batch_size=8)
    total = sum(lm.loglikelihood_rolling([SimpleNamespace(args=(doc,)) for doc in docs]))
    expected = -total / (sum(len(doc.encode("utf-8")) for doc in docs) * math.log(2))
    assert result["shakespeare_val_bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def harness_docs(n):
    sys.path.insert(0, harness.TASKS_DIR)
    try:
        import shakespeare
    finally:
        sys.path.remove(harness.TASKS_DIR)
    return [row["text"] for row in shakespeare.validation_split()["validation"]][:n]


BROKEN_TASKS = {  # task files that parse as YAML but that the harness cannot build
    "a Jinja template that does not parse": "doc_to_target: '{{ text '\n",
    "an unknown output_type": "output_type: guessing\n",
    "a !function whose module is missing": "custom_dataset: !function no_such_module.split\n",
    "no dataset_path": None,
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=[] if k == 0 else pytest.mark.slow)
                                  for k, case in enumerate(BROKEN_TASKS)])
def test_a_task_file_the_harness_cannot_build_is_one_line_naming_the_task(case, tmp_path, capsys):
    tiny_checkpoint(tmp_path)
    base = (open(os.path.join(harness.TASKS_DIR, "shakespeare_val.yaml")).read().replace("shakespeare_val", "broken")
            .replace("custom_dataset: !function shakespeare.validation_split\n", "dataset_path: text\n"))
    if case == "no dataset_path":
        base = base.replace("dataset_path: text\n", "")
    else:
        key = BROKEN_TASKS[case].split(":")[0]
        base = "\n".join(line for line in base.splitlines() if not line.startswith(key + ":")) + "\n" + \
            BROKEN_TASKS[case]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.yaml").write_text(base)
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--init_from", str(tmp_path), "--dataset_path", "none", "--device", "cpu", "--tasks",
                          "broken", "--tasks_path", str(tmp_path / "tasks"), "--limit", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --tasks broken: ") and "fix its YAML" in err[0] or \
        err[0].startswith("error: unknown lm-eval task broken"), err  # (a file the registry skips: unknown)


def test_results_that_cannot_be_written_are_refused_before_any_evaluation(tmp_path, capsys, monkeypatch):
    tiny_checkpoint(tmp_path)
    monkeypatch.setattr(eval_script, "evaluate_split", lambda *a: pytest.fail("evaluated before the refusal"))
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--init_from", str(tmp_path), "--dataset_path", "input.txt", "--device", "cpu",
                          "--tasks", "shakespeare_val", "--results_path", str(tmp_path / "gone" / "lm_eval.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "cannot write the results to" in err and "pass --results_path FILE" in err


# slow: each reads the harness's whole task registry (pytest -m slow)
@pytest.mark.parametrize("case", [pytest.param("unknown task", marks=pytest.mark.slow),
                                  pytest.param("task file that does not parse", marks=pytest.mark.slow),
                                  pytest.param("no network for a task's data", marks=pytest.mark.slow),
                                  "no lm-eval", "no task named", "tasks_path not a folder"])
def test_bad_tasks_are_one_line(case, tmp_path, capsys, monkeypatch):
    tiny_checkpoint(tmp_path)
    flags = ["--init_from", str(tmp_path), "--dataset_path", "none", "--device", "cpu", "--tasks", "no_such_task"]
    if case == "task file that does not parse":
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "broken.yaml").write_text("task: broken\noutput_type: [unclosed\n")
        flags += ["--tasks_path", str(tmp_path / "tasks"), "--tasks", "broken"]
    if case == "no task named":
        flags += ["--tasks", " , "]
    if case == "tasks_path not a folder":
        flags += ["--tasks_path", str(tmp_path / "no_such_folder")]
    if case == "no network for a task's data":
        def offline(**kwargs):
            raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")
        monkeypatch.setattr(harness, "simple_evaluate", offline)
        flags += ["--tasks", "shakespeare_val"]
    if case == "no lm-eval":
        monkeypatch.delitem(sys.modules, "harness")  # imported afresh, without lm_eval to import
        monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(flags)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(err) == 1
    expected = {"unknown task": "unknown lm-eval task no_such_task", "no lm-eval": "pip install lm-eval",
                "task file that does not parse": "broken.yaml does not parse",
                "no task named": "names no task", "tasks_path not a folder": "no_such_folder is not a folder",
                "no network for a task's data": "shakespeare_val: cannot download the task's data (Couldn't reach",
                }[case]
    assert expected in err[0]
