"""wandb that works on a first run and survives a kill: offline unless you are logged in, its files beside the run,
and one wandb run per training run, across resumes.

:func:`configure_wandb` sets wandb's environment before the trainer's ``WandbCallback`` starts a run:

* **Mode.** Without a login (``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``) wandb would stop the
  run asking for an API key; anchor sets ``WANDB_MODE=offline`` instead and says so in one line. ``wandb sync``
  uploads the run later.
* **Where.** ``WANDB_DIR`` defaults to the run's ``output_dir``, so wandb's files sit with the run's checkpoints
  (``<output_dir>/wandb/``), never in the directory the command was started from.
* **One run across resumes.** The wandb run id is stored in ``<output_dir>/wandb_run_id`` when a run starts. A run
  resumed from a checkpoint reuses it (``WANDB_RUN_ID`` with ``WANDB_RESUME=allow``): online, wandb continues the
  same run; offline, each part is written under the same id and ``wandb sync`` of all parts uploads them, in order,
  as that one run.
* **Several runs in one process** (``--compare``) each get their own id and directory: wandb reads its environment
  once per process, so a finished run's wandb setup is torn down before the next run's variables are set.
* **A kill loses seconds, not the run.** wandb writes a run's data to its ``.wandb`` file every 15 s by default,
  so a run killed early kept only the file's header; anchor flushes every :data:`FLUSH_INTERVAL_S` seconds.

Whatever you set yourself (``WANDB_MODE``, ``WANDB_DIR``, ``WANDB_RUN_ID``, ``WANDB_RESUME``, the flush interval)
is left alone. On the other processes of a distributed run (``RANK`` > 0), which do not log to wandb, it does
nothing, so every process may call it.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from anchor.io import atomic_write_text

RUN_ID_FILE = "wandb_run_id"
FLUSH_INTERVAL_S = 2.0
FLUSH_VARIABLE = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"  # wandb's setting x_transaction_log_flush_interval
DEFAULT_HOST = "https://api.wandb.ai"

_ours: dict[str, str] = {}
"""Variables this module set and their values: a later call (the second run of ``--compare``) may change them,
while a value the user set is never touched."""

__all__ = ["FLUSH_INTERVAL_S", "RUN_ID_FILE", "configure_wandb", "wandb_logged_in", "wants_wandb"]


def wants_wandb(report_to: str | Sequence[str] | None) -> bool:
    """Whether a trainer with this ``report_to`` logs to wandb (``"all"`` does when wandb is installed)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or ())
    if "all" in names:
        return importlib.util.find_spec("wandb") is not None
    return "wandb" in names


def wandb_logged_in() -> bool:
    """Whether wandb has credentials: ``WANDB_API_KEY``, or a ``~/.netrc`` (or ``$NETRC``) entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _user_set(name: str) -> bool:
    return name in os.environ and os.environ[name] != _ours.get(name)


def _set(name: str, value: str) -> None:
    os.environ[name] = _ours[name] = value


def _unset(name: str) -> None:
    if name in _ours and os.environ.get(name) == _ours.pop(name):
        del os.environ[name]


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits  # what wandb's own ids use
    return "".join(secrets.choice(alphabet) for _ in range(8))


def configure_wandb(output_dir: str | os.PathLike, report_to: str | Sequence[str] | None,
                    resume: bool = False) -> str | None:
    """Prepare wandb's environment for a training run into ``output_dir`` (see the module doc).

    ``resume``: the run continues from a checkpoint (``resume_from_checkpoint``). Returns the one line to print
    (mode, run id, where the files are, how to upload them), or None when ``report_to`` does not include wandb or
    this is not the main process.
    """
    if not wants_wandb(report_to) or os.environ.get("RANK", "0") != "0":  # only rank 0 logs; only it keeps the id
        return None
    wandb = sys.modules.get("wandb")  # imported only if something in this process already used it
    if wandb is not None and wandb.run is not None:
        return f"wandb: logging to the run already started in this process ({wandb.run.id}); nothing changed."
    if wandb is not None:
        wandb.teardown()  # wandb reads its environment once per process: forget it, so this run's variables count
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not _user_set("WANDB_MODE"):
        if wandb_logged_in():
            _unset("WANDB_MODE")
        else:
            _set("WANDB_MODE", "offline")
    if not _user_set("WANDB_DIR"):
        _set("WANDB_DIR", str(out))
    if not _user_set(FLUSH_VARIABLE):
        _set(FLUSH_VARIABLE, f"{FLUSH_INTERVAL_S:g}")

    id_file = out / RUN_ID_FILE
    stored = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else None
    if _user_set("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    else:
        run_id = stored or _new_run_id()
        _set("WANDB_RUN_ID", run_id)
    continuing = resume and stored == run_id
    if not _user_set("WANDB_RESUME"):
        if continuing:
            _set("WANDB_RESUME", "allow")
        else:
            _unset("WANDB_RESUME")
    atomic_write_text(id_file, run_id + "\n")

    files = Path(os.environ["WANDB_DIR"]) / "wandb"
    run = f"{'continuing' if continuing else 'new'} run {run_id}"
    if resume and not continuing and not _user_set("WANDB_RUN_ID"):
        run += f" (no {RUN_ID_FILE} in {out} to continue)"
    mode = os.environ.get("WANDB_MODE", "online")
    if mode == "offline":
        why = "no login found, so " if not wandb_logged_in() and not _user_set("WANDB_MODE") else ""
        return (f"wandb: {why}{run} logs offline to {files}; upload it with "
                f"`wandb sync {files}/offline-run-*-{run_id}` (every part, as one run).")
    return f"wandb: {run} logs in mode {mode}; local files in {files}."
