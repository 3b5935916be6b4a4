"""Options every ``anchor`` command shares, declared once: which model, on which device, in which precision, with
which axis bundle, and the checks that refuse a bad value before anything slow starts.

A command adds them with :func:`add_model_options` (``--model --device --dtype``, and ``--seed`` on request) and
:func:`add_axis_options` (``--axis --no-check-weights``), then loads with :func:`load_model_from_args` or
:func:`load_model_and_axis`. Those check the device and the model source first: a local path that does not exist,
a device torch cannot use, or a hub id while the hub cannot be reached get one line each, at once, instead of a
traceback after a minute of retries.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "smollm2"
"""``anchor.models.EMBEDDED``, written out so that ``anchor --help`` does not import torch (a test keeps them equal)."""
HUB_TIMEOUT_S = 3.0
"""How long to wait for the model hub before deciding there is no network (and using the local cache only)."""


def at_least(minimum: int, why: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused at parse time (before the model loads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: {why}")
        return value

    return parse


def add_model_options(parser: argparse.ArgumentParser, seed: bool = False) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--layers-path`` (and ``--seed`` when ``seed``): which model to load,
    and how."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id, local directory, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct, "
                             "default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16, fp16 or auto")
    parser.add_argument("--layers-path", default=None, metavar="DOTTED.PATH",
                        help="where the decoder layers are, for an architecture anchor does not know, e.g. "
                             "model.layers (recorded in the model's config)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed of the sampled prompts (default 0)")


def add_axis_options(parser: argparse.ArgumentParser) -> None:
    """``--axis`` and ``--no-check-weights``: the bundle to use and whether it must come from these exact weights."""
    parser.add_argument("--axis", default=None,
                        help="axis bundle directory (from `anchor axis`); default: a small axis computed once per "
                             "model and cached")
    parser.add_argument("--no-check-weights", action="store_true",
                        help="accept a fine-tune of the model the axis was computed on (shapes are still checked)")


def check_device(device: str | None) -> str:
    """``device`` if torch can use it here, else ValueError naming the fix; ``None`` picks cuda when available."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA GPU here; use "
                             "--device cpu, or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices, numbered from 0.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu.")
    return str(parsed)


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id (``org/name`` or ``name``): it starts with ``.``,
    ``/`` or ``~``, ends with a separator, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1 or (
        os.sep != "/" and os.sep in name)


def check_model_source(name: str) -> None:
    """Refuse a model name that cannot load, before loading: a local path that does not exist, or a file that is
    not a ``.gguf``.

    For a hub id, check that the hub answers within :data:`HUB_TIMEOUT_S`; when it does not, switch the hub
    client to offline mode (the local cache only) and say so, instead of retrying for about a minute.
    """
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL or path.is_dir():
        return
    if path.is_file():
        from anchor.models import gguf_file

        if gguf_file(path) is None:
            raise NotADirectoryError(f"--model {name} is a file; give the model's directory (the one with "
                                     "config.json) or a .gguf file.")
        return
    if looks_local(name):
        raise FileNotFoundError(f"--model {name}: no such directory. Give a model directory, a hub id such as "
                                f"HuggingFaceTB/SmolLM2-135M-Instruct, or '{DEFAULT_MODEL}' (the embedded model).")
    if not hub_offline() and not hub_reachable():
        go_offline()
        print(f"anchor: the model hub cannot be reached; looking for {name} in the local hub cache only.")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers at all (any HTTP status counts; proxies in the environment are used)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, refused connection, timeout, proxy failure: all mean the same here
        return False
    return True


def go_offline() -> None:
    """Offline mode for this process: ``HF_HUB_OFFLINE`` for child processes, the hub client's flag for this one
    (it reads the variable once, at import)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def load_model_from_args(args: argparse.Namespace) -> tuple[object, object]:
    """``(model, tokenizer)`` named by :func:`add_model_options`' options, checked first, on the checked device."""
    from anchor.models import load_model

    device = check_device(args.device)
    check_model_source(args.model)
    source = Path(args.model).expanduser()
    try:
        return load_model(str(source) if source.exists() else args.model, device=device, dtype=args.dtype,
                          layers_path=args.layers_path)
    except ValueError as err:
        if "layers_path" in str(err):  # an architecture anchor does not know: say the command-line spelling too
            raise ValueError(f"{err} On the command line: --layers-path DOTTED.PATH.") from None
        raise
    except OSError as err:
        if looks_local(args.model) or source.exists():
            raise OSError(f"--model {args.model}: not a model directory transformers can load "
                          f"({str(err).splitlines()[0]})") from None
        if hub_offline():
            from huggingface_hub import constants

            raise OSError(f"--model {args.model} is not a local directory and is not in the local hub cache "
                          f"({constants.HF_HUB_CACHE}), and the hub is offline. Download it where there is network "
                          f"(`hf download {args.model}`), or pass a local directory.") from None
        raise OSError(f"--model {args.model}: neither a local directory nor a model on the hub "
                      f"({str(err).splitlines()[0]}). Check the spelling, or log in for a private model.") from None


def load_model_and_axis(args: argparse.Namespace) -> tuple[object, object, object]:
    """The model, tokenizer and axis the shared options name, the axis checked against the model.

    A given ``--axis`` is read before the model is loaded, so a bad bundle is refused in a second.
    """
    from anchor.axis import AssistantAxis, cached_axis

    axis = AssistantAxis.from_pretrained(args.axis) if args.axis else None
    model, tokenizer = load_model_from_args(args)
    if axis is None:
        print("No --axis given: using the cached default axis of this model (computed on first use).")
        axis = cached_axis(model, tokenizer, progress=not getattr(args, "quiet", False))
    axis.check_compatible(model, check_weights=not args.no_check_weights)
    return model, tokenizer, axis
