"""
Export a model to the Hugging Face format, for transformers, lm-evaluation-harness and the rest of that ecosystem.

    python export.py --init_from out --out_dir out/hf
    python export.py --init_from out --out_dir out/hf --overwrite    # replace an earlier export
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('ROMEO:'))"
    lm_eval --model hf --model_args pretrained=out/hf --tasks hellaswag

The directory gets config.json and model.safetensors (hf.save_pretrained), and GPT-2's tokenizer as vocab.json
and merges.txt (hf.save_tokenizer), written from the repo's own tokenizer file, so it loads with AutoTokenizer too;
for a model fine-tuned on chat data (a checkpoint of --dataset_type chat, or a Hugging Face directory that has one),
its tokenizer_config.json carries the chat template that data was rendered in (tokenizer.chat_template), so
tokenizer.apply_chat_template(messages) gives the tokens the model was trained on; other models get none, and
transformers refuses chat messages for them rather than render a template they never saw.

A LoRA checkpoint (train.py --lora_rank) is exported with its adapters merged into its base: a plain GPT-2. With
--peft, its adapters are exported alone instead, as a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) for peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), DIR). BASE is
where the base came from when that is a Hugging Face directory or hub name; when it is not (a checkpoint of ours, or
a LoRA run from scratch), the base is exported too, to DIR/base (with the tokenizer), and adapter_config.json names
that path.

    python export.py --init_from out-lora --out_dir out/peft --peft

A directory that already holds files is refused: Hugging Face loaders would read some stale ones (tokenizer.json,
pytorch_model.bin, another model's shards) instead of the export's. --overwrite replaces it whole, old files gone.
The export is written into a temporary directory beside --out_dir and renamed into place: a failed export leaves
--out_dir as it was, and a killed one never leaves it half-written (at worst a hidden .NAME.*.new or .old beside it).
"""

import json
import os
import shutil
import sys
import tempfile

import torch

import hf
import lora
from checkpoint import is_checkpoint, load_adapted, load_model, trained_on
from model import GPT
from cli import HelpFormatter, OneLineParser, UserError, print_error


def main(argv=None):
    p = OneLineParser(description="Export a model to the Hugging Face format.",
                      formatter_class=HelpFormatter)
    p.add_argument("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), or a Hugging "
                   "Face GPT-2 directory or hub name")
    p.add_argument("--out_dir", required=True, help="the directory to write (created if needed); one that already "
                   "holds files is refused without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it holds files: they are all "
                   "deleted (one holding subdirectories is refused)")
    p.add_argument("--peft", action="store_true", help="a LoRA checkpoint's adapters alone, as a PEFT adapter "
                   "directory, instead of the merged model (with its base in --out_dir/base when the base is not a "
                   "Hugging Face directory or hub name)")
    args = p.parse_args(argv)
    try:
        out_dir = os.path.realpath(args.out_dir)  # through a symlink: the link then points at the new export
        check_out_dir(out_dir, args)  # before loading: a refusal should not wait for gpt2-xl to load
        if args.peft:
            export_peft(args, out_dir)
            return
        model = load_model(args.init_from)
        chat = has_chat_template(args.init_from)

        def write(directory):
            hf.save_pretrained(model, directory)
            hf.save_tokenizer(directory, model.config.block_size, chat=chat)
        write_whole(out_dir, write)
    except (UserError, ValueError) as e:
        print_error(e)
        sys.exit(2)
    except OSError as e:
        print_error(f"cannot write {args.out_dir}: {e.strerror or e}; nothing there was changed")
        sys.exit(2)
    print(f"wrote {args.out_dir}: {model.num_params() / 1e6:.2f}M parameters, loads with "
          f"transformers.GPT2LMHeadModel.from_pretrained({args.out_dir!r})")


def export_peft(args, out_dir):
    """--peft: the adapters of the LoRA checkpoint args.init_from as a PEFT adapter directory, and its base in
    out_dir/base when transformers could not load the base from where it came from."""
    model, record = load_adapted(args.init_from)
    if record is None:
        raise UserError(f"--peft exports LoRA adapters, and {args.init_from} is not a LoRA checkpoint (train one "
                        f"with train.py --lora_rank R): drop --peft to export its weights")
    base = record["base"]
    with_base = base is None or is_checkpoint(base)  # a checkpoint of ours, or a random initialisation

    def write(directory):
        lora.save_peft(model, directory, os.path.join(out_dir, "base") if with_base else base)  # (into an empty one)
        if with_base:
            base_dir = os.path.join(directory, "base")
            hf.save_pretrained(base_of(model), base_dir)
            hf.save_tokenizer(base_dir, model.config.block_size, chat=has_chat_template(args.init_from))
    write_whole(out_dir, write)
    loads = f"GPT2LMHeadModel.from_pretrained({os.path.join(args.out_dir, 'base') if with_base else base!r})"
    print(f"wrote {args.out_dir}: LoRA adapters of rank {record['rank']}, load with "
          f"peft.PeftModel.from_pretrained({loads}, {args.out_dir!r})")


def base_of(model):
    """The frozen base of an adapted model as a plain GPT, its tensors shared, not copied."""
    with torch.device("meta"):
        base = GPT(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lora.is_adapter_key(k)}, assign=True)
    return base


def has_chat_template(source):
    """Whether the weights at source were fine-tuned on conversations: a checkpoint of --dataset_type chat, or a
    Hugging Face directory whose tokenizer_config.json has a chat_template."""
    trained = trained_on(source)
    if trained is not None:
        return trained == "chat"
    try:
        with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
            return "chat_template" in json.load(f)
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def check_out_dir(out_dir, args):
    """Refuse an --out_dir whose old files would mix with the export, or whose replacement could lose data."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {args.out_dir} is a file, not a directory: choose another --out_dir")
    names = sorted(os.listdir(out_dir))
    if names and not args.overwrite:
        raise UserError(f"--out_dir {args.out_dir} already holds files ({', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}): pass --overwrite to replace them all, or choose "
                        f"another --out_dir")
    # --overwrite deletes the files of a model directory; a subdirectory is more likely someone's data (a run's
    # out_dir, a dataset) than part of a model, so it is left for the user to move rather than deleted
    subdirs = [name for name in names if os.path.isdir(os.path.join(out_dir, name))]
    if subdirs:
        raise UserError(f"--out_dir {args.out_dir} holds a directory ({subdirs[0]}), which --overwrite does not "
                        f"delete: move it out, or choose another --out_dir")
    source = os.path.realpath(args.init_from)
    if names and os.path.exists(args.init_from) and (source == out_dir or source.startswith(out_dir + os.sep)):
        raise UserError(f"--out_dir {args.out_dir} holds the model being exported ({args.init_from}), which "
                        f"--overwrite would delete: choose another --out_dir")


def write_whole(out_dir, write):
    """write(directory) into a new temporary directory beside out_dir, then rename it to out_dir, the old one (if
    any) renamed aside first and deleted last. Beside it means on the same filesystem, where a rename is atomic: at
    every moment out_dir is the old directory or the new one, whole (or, between the two renames, absent)."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=f".{name}.", suffix=".new", dir=parent)
    old = new.removesuffix(".new") + ".old"
    try:
        write(new)
        os.chmod(new, 0o777 & ~hf.current_umask())  # mkdtemp makes it private (0700), unlike os.mkdir
        try:
            if os.path.exists(out_dir):
                os.rename(out_dir, old)
            os.rename(new, out_dir)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(out_dir):
                os.rename(old, out_dir)  # put the old one back
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    # the export is in place: an old copy that cannot be deleted is only a hidden directory's worth of space
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
