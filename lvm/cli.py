"""The ``lvm`` console script: a thin layer over the Python API.

Each sub-command is a dataclass config plus the function that runs it; every config field is a
flag of the same name (``batch_size`` -> ``--batch-size``), so nothing the CLI does is out of
reach from Python. Bad input ends with one line ``lvm <command>: error: ...`` and exit status 2
(``LVM_DEBUG=1`` keeps the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import typing
from typing import Any, Callable

# name -> (module, config class, runner, one-line help); imported lazily so `lvm --help` is instant.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "tokenizer-train": (
        "lvm.tokenizer_train", "TokenizerTrainConfig", "train_tokenizer",
        "train the VQ/FSQ visual tokenizer on a source of images",
    ),
    "tokenize": (
        "tokenizer.shards", "TokenizeConfig", "run_tokenize",
        "encode a source of images into token shards (resumable)",
    ),
    "train": (
        "lvm.train", "TrainConfig", "train",
        "pretrain the LVM on token shards (resumable; works under torchrun)",
    ),
    "generate": (
        "lvm.generate", "GenerateConfig", "generate",
        "continue or complete images with a trained LVM; writes a PNG grid and token ids",
    ),
    "probe": (
        "lvm.probe", "ProbeConfig", "run_probe",
        "label-efficiency curves (linear, attentive, fine-tune probes) of LVM features vs baselines",
    ),
    "quickstart": (
        "lvm.quickstart", "QuickstartConfig", "quickstart",
        "the whole pipeline on Fashion-MNIST into one folder with a report (resumable)",
    ),
    "classifier-train": (
        "lvm.classifier_train", "ClassifierTrainConfig", "classifier_train",
        "fit a probe head on all given labels and write a self-contained classifier bundle",
    ),
    "predict": (
        "lvm.predict", "PredictConfig", "run_predict",
        "class labels and probabilities of image files with a classifier bundle, as CSV",
    ),
    "embed": (
        "lvm.predict", "EmbedConfig", "run_embed",
        "pooled features of image files with a classifier bundle, as .npy plus a paths list",
    ),
    "export": (
        "lvm.export", "ExportConfig", "run_export",
        "a classifier bundle as one ONNX graph (pixels -> probabilities) for ONNX Runtime",
    ),
    "serve": (
        "lvm.serve", "ServeConfig", "serve",
        "a classifier bundle over HTTP (FastAPI + uvicorn) with request limits",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the sub-command, and turn user errors into one-line messages."""
    parser = argparse.ArgumentParser(prog="lvm", description="Domain-specific Large Vision Model toolkit.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in COMMANDS.items():
        subs.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    module_name, config_name, runner_name, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    config_cls, runner = getattr(module, config_name), getattr(module, runner_name)
    sub = argparse.ArgumentParser(prog=f"lvm {args.command}", description=help_text)
    add_dataclass_arguments(sub, config_cls)
    flags = vars(sub.parse_args(rest))
    user_errors = _user_errors()
    try:
        result = runner(config_cls(**flags))  # a config's own checks (__post_init__) report like the runner's
    except KeyboardInterrupt:
        print(f"lvm {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except user_errors as err:
        if os.environ.get("LVM_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line even when a message spans several
        print(f"lvm {args.command}: error: {message}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per dataclass field, typed from its annotation, help from its trailing comment."""
    hints = typing.get_type_hints(config_cls)
    comments = _field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or comments.get(f.name, "")
        help_text = f"{help_text} (default: {default})".strip().replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            (item,) = set(typing.get_args(kind)) - {Ellipsis}
            parser.add_argument(flag, type=item, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_scalar_type(kind), default=default, help=help_text)


def _scalar_type(kind: Any) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind  # `int | None` -> int


def _field_comments(config_cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M)}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The project's own error classes: bad input, reported in one line. Anything else (a plain
    ValueError, KeyError, ...) is a bug and keeps its traceback. Imported here, not at the top, so
    ``lvm --help`` stays instant."""
    from lvm.checkpoint import CheckpointError, CheckpointMismatch
    from lvm.classifier import BundleError
    from lvm.data import DataError
    from lvm.probe import ProbeError
    from lvm.runtime import ConfigError
    from lvm.train import TrainingDiverged
    from tokenizer.images import ImageSourceError
    from tokenizer.model import TokenizerError
    from tokenizer.shards import ShardError

    return (
        ImageSourceError, ShardError, TokenizerError, DataError, ConfigError, CheckpointError, CheckpointMismatch,
        ProbeError, TrainingDiverged, BundleError,
    )


def _print_summary(result: Any) -> None:
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=_summary_value))
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        print(json.dumps(dataclasses.asdict(result), indent=2, default=_summary_value))


def _summary_value(obj: Any) -> str:
    """Paths and the like as text; a fitted model a runner hands back to Python callers (``lvm probe``'s
    ``linear_probe``) as its type name, not thousands of numbers."""
    if (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or type(obj).__module__.startswith("torch"):
        return f"<{type(obj).__name__}>"
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
