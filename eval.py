"""
Evaluate a model: loss, perplexity and bits per byte over a whole split, and HellaSwag accuracy.

    python eval.py --init_from out                               # the run's own validation data
    python eval.py --init_from gpt2 --dataset_path input.txt     # any model on a text file's last 10%
    python eval.py --init_from out --dataset_type shards --dataset_path fineweb10B --max_tokens 10_000_000
    python eval.py --init_from gpt2 --hellaswag_path hellaswag_val.jsonl   # or 'download' (online)

Text and shards: the split is cut into consecutive windows of --seq_len tokens, each token predicted once with the
preceding tokens of its window as context. Alpaca: every example of the split, loss on its response. Bits per byte
divide the loss by the UTF-8 bytes of the predicted tokens, so models with other tokenizers or context lengths
compare. Prints a line per metric, then one JSON line.
"""

import json
import os
import sys
import tempfile
import time

from checkpoint import is_checkpoint, load_checkpoint, load_model
from tokenizer import IGNORE_INDEX
from evaluation import evaluate, hellaswag_accuracy, load_hellaswag
from cli import HelpFormatter, OneLineParser, UserError, add_device_flags, non_negative_int, positive_int, print_error
from files import DataError, WriteError, write_atomically
from options import add_data_flags, given_flags, make_loader
from runtime import setup_runtime


def build_parser():
    p = OneLineParser(description="Evaluate a model on a split and on HellaSwag. A checkpoint's run gives the defaults "
                      "of --dataset_type, --dataset_path and --seq_len (the flags given win); --dataset_path none "
                      "skips the split.", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 "
      "directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    add_data_flags(p)  # train.py's
    a("--split", default="val", choices=["val", "train"], help="which split to evaluate")
    a("--seq_len", type=positive_int, help="tokens per window (default: the checkpoint's run's, else the model's "
      "context)")
    a("--batch_size", type=positive_int, default=8, help="windows or examples per forward pass")
    a("--max_tokens", type=positive_int, help="stop after about this many predicted tokens (default: the whole split)")
    a("--hellaswag_path", help="HellaSwag's hellaswag_val.jsonl, or 'download' (online)")
    a("--hellaswag_limit", type=positive_int, help="score only the first N items")
    a("--tasks", help="comma-separated lm-evaluation-harness tasks to run on the model, in memory (needs lm-eval): "
      "the harness's own (online) and those of --tasks_path, e.g. shakespeare_val (offline)")
    a("--tasks_path", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks"),
      help="a folder of lm-eval task YAML files, added to the harness's")
    a("--limit", type=positive_int, help="--tasks: the first N documents of each task")
    a("--num_fewshot", type=non_negative_int, help="--tasks: examples in each prompt (default: each task's)")
    a("--results_path", help="--tasks: where the harness's whole results go (default: lm_eval.json beside the "
      "checkpoint; for a hub name, in the current directory)")
    add_device_flags(p)
    return p


def evaluate_split(model, args, rt):
    batches = make_loader(args, accum_steps=1).eval_batches(args.split, args.batch_size, args.max_tokens)
    result = evaluate(model, with_progress(batches, args.max_tokens), rt)
    return {"loss": result["loss"], "ppl": result["ppl"], "bpb": result["bpb"], "tokens": result["labels"]}


def with_progress(batches, max_tokens):
    """The batches, with a line on stderr at most once a second of the tokens predicted so far (a split of shards
    takes minutes), the last figure when they end."""
    predicted, shown, started = 0, 0.0, time.time()
    for batch in batches:
        yield batch
        predicted += int((batch[1] != IGNORE_INDEX).sum())
        if time.time() - shown >= 1:
            shown = time.time()
            of = f" of about {max_tokens:,}" if max_tokens else ""
            print(f"\revaluating: {predicted:,}{of} tokens, {predicted / (shown - started):,.0f} tokens/s", end="",
                  file=sys.stderr, flush=True)
    if shown:
        print(f"\revaluating: {predicted:,} tokens in {time.time() - started:.0f} s", file=sys.stderr, flush=True)


def run_harness(model, rt, args, path):
    """lm-eval's tasks (harness.py), each metric as "task_metric"; the harness's whole results are written to
    lm_eval.json beside the checkpoint (for a hub name, in the current directory)."""
    try:
        import harness
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "lm_eval":
            raise UserError("--tasks needs lm-evaluation-harness: pip install lm-eval")
        raise
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise UserError(f"--tasks {args.tasks!r} names no task: give lm-eval task names, comma-separated")
    if not os.path.isdir(args.tasks_path):
        raise UserError(f"--tasks_path {args.tasks_path} is not a folder: give a folder of lm-eval task YAML files")
    out = harness.run_tasks(model, rt, names, args.seq_len, args.batch_size, args.limit, args.num_fewshot,
                            args.tasks_path)
    try:
        write_atomically(path, lambda f: f.write(json.dumps(out["results"], indent=1, default=str)), mode="w")
        print(f"lm-eval results: {path}", file=sys.stderr)
    except WriteError as e:  # (checked before any evaluation: the folder changed since) the figures still print
        print(f"warning: {e}", file=sys.stderr)
    return {f"{task}_{metric.split(',')[0]}": value for task, metrics in out["results"].items()
            for metric, value in metrics.items() if isinstance(value, float) and not metric.endswith("_stderr")}


def results_path(args):
    """--results_path, or lm_eval.json beside the checkpoint; checked to be writable before any task runs, so that
    minutes of evaluation are never thrown away for a read-only folder."""
    where = args.init_from if os.path.isdir(args.init_from) else os.path.dirname(args.init_from) \
        if is_checkpoint(args.init_from) else "."
    path = args.results_path or os.path.join(where, "lm_eval.json")
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
    except OSError as e:
        raise UserError(f"cannot write the results to {path} ({e.strerror}): pass --results_path FILE in a folder "
                        f"you can write to")
    return path


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, sys.argv[1:] if argv is None else argv)
    try:
        saved = {}
        if is_checkpoint(args.init_from):
            # the run's own data, by default (a look at the config: load_model checks the weights below)
            saved = load_checkpoint(args.init_from, mmap=True, verify=False)["config"]
        for name in ("dataset_type", "dataset_path"):
            if name not in given and name in saved:
                setattr(args, name, saved[name])
        rt = setup_runtime(args.device, args.dtype)
        model = load_model(args.init_from).to(rt.device).eval()
        args.seq_len = args.seq_len or saved.get("seq_len") or model.config.block_size
        if args.seq_len > model.config.block_size:
            raise UserError(f"--seq_len {args.seq_len} is longer than the model's context "
                            f"({model.config.block_size})")
        args.seed = saved.get("seed", 1337)  # the seed of the Alpaca split and of the loaders' defaults (make_loader)
        results = {"model": args.init_from}
        path = results_path(args) if args.tasks else None  # before any evaluation: a refusal costs nothing
        if args.dataset_path != "none":
            split = evaluate_split(model, args, rt)
            results.update({f"{args.split}_{name}": value for name, value in split.items()})
            results["dataset"] = f"{args.dataset_type}:{args.dataset_path}"
        if args.hellaswag_path:
            items = load_hellaswag(args.hellaswag_path, rt)[: args.hellaswag_limit]
            scores = hellaswag_accuracy(model, items, rt)
            results.update({"hellaswag_items": len(items), **{f"hellaswag_{k}": v for k, v in scores.items()}})
        if args.tasks:
            results.update(run_harness(model, rt, args, path))
    except (UserError, DataError) as e:
        print_error(e)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while loading or evaluating: stop, without a traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    for key, value in results.items():
        print(f"{key:<20} {value:.4f}" if isinstance(value, float) else f"{key:<20} {value}")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
