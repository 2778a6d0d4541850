"""Helpers shared by the converters: building an encoder straight from converted weights, naming
what a refused pickle would have run, one-line error details."""
from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from mimc.errors import UnsafeCheckpointError
from mimc.models.vit import Encoder, EncoderConfig

# Globals a plain tensor checkpoint legitimately references (used only to word the error message).
_TENSOR_GLOBALS = re.compile(
    r"^(torch\..+|numpy\..+|collections\.OrderedDict|_codecs\.encode|argparse\.Namespace"
    r"|builtins\.(set|frozenset|bytearray|slice|complex|dict|list|tuple|int|float|str|bytes|bool))$"
)
# (mean, std): timm's IMAGENET_DEFAULT, and transformers' IMAGENET_STANDARD (BEiT's normalisation).
IMAGENET_DEFAULT = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
IMAGENET_STANDARD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
)  # fmt: skip


def encoder_with_weights(cfg: EncoderConfig, state: dict[str, torch.Tensor], copy: bool = True, strict: bool = True):
    """Build an :class:`Encoder` for ``cfg`` and load ``state`` into it.

    ``copy=False`` adopts the given tensors as the parameters (no second copy of the weights);
    use it only when nothing else keeps the tensors, e.g. a checkpoint just read from disk. Tensors
    read from .safetensors stay memory-mapped copy-on-write, as in transformers: the file is never
    written, and replacing it by rename (as every mimc write does) leaves the loaded weights intact.
    Returns ``(encoder, load_result)``; with ``strict`` a missing or extra key raises.
    """
    # torch.nn.init is a no-op while the encoder is built: random init of a ViT-B costs over a second of CPU
    # for numbers the load overwrites at once (transformers' ``no_init_weights`` does the same).
    with mock.patch.multiple(nn.init, **{name: lambda tensor, *args, **kwargs: tensor for name in _INIT_FUNCTIONS}):
        encoder = Encoder(cfg)
    state = {k: v.float().contiguous() for k, v in state.items()}
    result = encoder.load_state_dict(state, strict=strict, assign=not copy)
    return encoder.eval(), result


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a checkpoint: data.pkl inside torch's zip format, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return zf.read(name) if name else b""
    return path.read_bytes()


def pickle_code_global(path: Path) -> str | None:
    """Statically list the pickle's imports (nothing is executed) and return one that is not a
    tensor type. Only words the error; safety itself comes from ``weights_only=True``."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(_pickle_bytes(path))):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                name = arg.replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            else:
                continue
            if not _TENSOR_GLOBALS.match(name):
                return name
    except Exception:  # noqa: BLE001 - a malformed stream simply has no nameable global
        return None
    return None


def refuse_code_pickle(path: Path) -> None:
    """After a weights-only load failed: raise if the pickle would have run code, naming what."""
    culprit = pickle_code_global(path)
    if culprit is not None:
        raise UnsafeCheckpointError(
            f"{path} is a pickle that would run code on load ({culprit}): mimc loads weights only; "
            "re-save it as .safetensors where you trust it"
        ) from None
