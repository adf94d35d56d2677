"""
lm-evaluation-harness's tasks on a model of this repo, in memory: `eval.py --tasks`, with no export to a Hugging
Face directory first. Needs the lm-eval package (eval.py says so in one line when it is missing).

    results = run_tasks(model, rt, ["hellaswag", "shakespeare_val"], seq_len=1024, batch_size=8)

The harness asks a model three things, and HarnessModel answers each with the repo's own forward pass and GPT-2
tokenizer:
- loglikelihood(context, continuation): the continuation's log-probability after the context, and whether greedy
  decoding would have produced it (multiple-choice tasks: HellaSwag, ARC, PIQA, ...);
- loglikelihood_rolling(text): a whole text's log-probability (perplexity tasks), in consecutive windows of seq_len
  tokens after an <|endoftext|>, each token predicted once from its window's earlier tokens: data.windows, as
  eval.py evaluates a split, so the same text in the same windows gives the same nats;
- generate_until(context, until): greedy text, cut at the first stop string.
Tasks come from the harness's registry (the hub's datasets: online) and from the YAML files of include_path (this
repo's tasks/ folder by default, whose shakespeare_val runs offline).
"""

import os
import sys
import time

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from cli import UserError, first_line
from data import windows
from tokenizer import EOT_TOKEN, IGNORE_INDEX, get_tokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


class HarnessModel(LM):
    def __init__(self, model, rt, seq_len, batch_size):
        super().__init__()
        self.model, self.rt, self.seq_len, self.batch_size = model.eval(), rt, seq_len, batch_size
        self.tokenizer = get_tokenizer()
        self.asked = False  # whether the harness has sent a request yet (its tasks built by then)

    def requests(self, requests):
        """The harness's requests, with a progress line on stderr (the first lm-eval call can take minutes)."""
        self.asked = True
        shown = 0.0
        for k, request in enumerate(requests, 1):
            if time.time() - shown >= 1 or k == len(requests):
                shown = time.time()
                print(f"\rlm-eval: {k:,}/{len(requests):,} requests", end="\n" if k == len(requests) else "",
                      file=sys.stderr, flush=True)
            yield request

    @torch.no_grad()
    def nats(self, x, y):
        """Per-position losses (B, T) of the model on x with targets y (IGNORE_INDEX: not counted), and its
        logits, in the run's autocast."""
        with self.rt.autocast():
            logits, nats = self.model(x.to(self.rt.device), y.to(self.rt.device), loss_reduction="none")
        return nats.float(), logits

    def loglikelihood(self, requests):
        return [self.continuation_loglikelihood(*request.args) for request in self.requests(requests)]

    def continuation_loglikelihood(self, context, continuation):
        """(log p(continuation | context), whether greedy decoding gives it). Every token of the continuation counts,
        however long: windows of the model's context, from the end backwards, each predicting the targets the later
        ones did not, each token from up to block_size tokens before it. An empty continuation: log 1, and greedy."""
        target = self.tokenizer.encode_ordinary(continuation)
        tokens = (self.tokenizer.encode_ordinary(context) or [EOT_TOKEN]) + target
        start, end, n = len(tokens) - len(target), len(tokens), self.model.config.block_size
        total, greedy = 0.0, True
        while end > start:
            begin = max(0, end - n - 1)  # the window tokens[begin:end] predicts tokens[begin + 1:end]
            first = max(start, begin + 1)  # the first of them that is a target
            x, y = torch.tensor([tokens[begin : end - 1]]), torch.tensor([tokens[begin + 1 : end]])
            y[:, : first - begin - 1] = IGNORE_INDEX  # only the continuation counts
            nats, logits = self.nats(x, y)
            total -= nats.sum().item()
            greedy &= logits[0, first - begin - 1 :].argmax(-1).cpu().tolist() == tokens[first:end]
            end = first
        return total, greedy

    def loglikelihood_rolling(self, requests):
        results = []
        for request in self.requests(requests):
            tokens = [EOT_TOKEN] + self.tokenizer.encode_ordinary(request.args[0])
            total = sum(self.nats(x, y)[0].sum().item() for x, y, _ in windows(tokens, self.seq_len, self.batch_size,
                                                                             None))
            results.append(-total)
        return results

    def generate_until(self, requests):
        results = []
        for request in self.requests(requests):
            context, settings = request.args
            until = settings.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]  # (lm-eval allows one string)
            prompt = self.tokenizer.encode_ordinary(context) or [EOT_TOKEN]
            prompt = prompt[-self.model.config.block_size:]
            with self.rt.autocast():
                out = self.model.generate(torch.tensor([prompt], device=self.rt.device),
                                          settings.get("max_gen_toks", 256), temperature=0, stop_token=EOT_TOKEN)
            text = self.tokenizer.decode([t for t in out[0, len(prompt):].tolist() if t != EOT_TOKEN])
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results


def broken_task_file(include_path):
    """A task file of include_path that does not parse (the harness skips it, so its task is "unknown"): raised as
    the UserError naming it."""
    import glob

    import yaml

    class AnyTags(yaml.SafeLoader):  # lm-eval's own tags (!function ...) are not the question here
        pass

    AnyTags.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(glob.glob(os.path.join(include_path, "**", "*.yaml"), recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                yaml.load(f, AnyTags)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"task file {path} does not parse ({first_line(e)}): fix it, or move it out of "
                            f"{include_path}")


def run_tasks(model, rt, names, seq_len, batch_size, limit=None, num_fewshot=None, include_path=TASKS_DIR):
    """lm-eval's results dict for the tasks `names` on model; an unknown task is a UserError naming it."""
    # the folder's tasks alone first: indexing the harness's own ~15,000 task files takes 10 s or more
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        broken_task_file(include_path)
        raise UserError(f"unknown lm-eval task {', '.join(unknown)}: `lm-eval ls tasks` lists the harness's (their "
                        f"data downloads when online); YAML files in {include_path} add offline ones, e.g. "
                        f"shakespeare_val")
    lm = HarnessModel(model, rt, seq_len, batch_size)
    try:
        return simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                               log_samples=False, bootstrap_iters=0)
    except ConnectionError as e:  # a harness task's data comes from the Hugging Face hub (datasets raises this)
        raise UserError(f"--tasks {', '.join(names)}: cannot download the task's data ({first_line(e)}): run "
                        f"online once (the datasets cache keeps it), or use the offline tasks of {include_path}")
    except Exception as e:
        if lm.asked:  # the model was running: not the task's definition, so no one-line story to tell
            raise
        # before the first request: the harness building the task from its YAML (an unknown output_type, a
        # !function whose module is missing, a Jinja template that does not parse, no dataset_path, ...)
        raise UserError(f"--tasks {', '.join(names)}: the harness could not build the task ({type(e).__name__}: "
                        f"{first_line(e, 150)}): fix its YAML (in {include_path}, for this repo's tasks)")
