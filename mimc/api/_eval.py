"""The measuring verbs: evaluate (fidelity to a reference, k-NN) and inspect (every block criterion)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mimc.api._model import _load, _n_needs_data, _name
from mimc.api.reports import DictReport
from mimc.atomic import atomic_file
from mimc.errors import BadInputError, ConfigError, whole
from mimc.options import check_batch_size
from mimc.train.dist import check_one_process


class EvalReport(DictReport):
    """Fidelity to the reference (one :class:`~mimc.metrics.Fidelity` spelling) and k-NN top-1 of both."""


class InspectReport(DictReport):
    """Per-block scores of every criterion (low = removed first); with images the oracle and Spearman vs it."""


def evaluate(model, reference=None, data: Any = "builtin", *, val: Any = None, n: int | None = None, seed: int = 0,
             batch_size: int = 32, device: str | None = None, threads: int | None = None) -> EvalReport:
    """Feature fidelity of MODEL (an Encoder, a MODEL argument, a mimc ``.onnx``, an OpenVINO ``.xml``, a
    TensorRT ``.engine`` / ``.plan``) to ``reference``, and k-NN; both run on ``device`` (cpu or cuda;
    default: the runtime's own) with ``threads`` CPU inference threads.

    Without ``val``: k-NN leave-one-out over ``data``, fidelity on ``data``. With ``val`` (an image
    folder, .npy/.npz or 'builtin', labelled like ``data``): every val image is classified against
    ``data`` as the k-NN gallery (classes matched by name), and fidelity is measured on val
    (``fidelity_on``). ``n``: a seeded subset of this many images of each set. Under torchrun every
    rank runs its shard of each set and every rank returns rank 0's report (see :mod:`mimc.evaluation`).
    """
    from mimc.evaluation import evaluate as _evaluate
    from mimc.evaluation import load_for_eval
    from mimc.train.dist import context, shutdown

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be an integer >= 1, got {n!r}", option="n")
    check_batch_size(batch_size)
    ctx = context()  # WORLD_SIZE > 1 (torchrun): joins the process group (and picks this rank's GPU)
    cand = load_for_eval(model, device, threads)
    ref = load_for_eval(reference, device, threads) if reference is not None else None
    body = _evaluate(cand, ref, data=data, n=n, seed=seed, batch_size=batch_size, val=val,
                     rank=ctx.rank, world=ctx.world_size)
    shutdown()  # under torchrun every rank leaves the process group (a no-op otherwise)
    return EvalReport({"model": _name(model, None), "reference": _name(reference, None), **body})


def inspect(model="ref", *, data=None, n: int = 256, plot=None, dtype: str = "fp16", hist_bins: int = 65536,
            batch_size: int = 32, seed: int = 0) -> InspectReport:
    """Scores of every block criterion side by side; with ``data`` the oracle sensitivity and each
    criterion's Spearman correlation with it; ``plot``: also write a PNG (``True``: ``./<model>-blocks.png``)."""
    from mimc.compression.block_scores import ENTROPY_DTYPES, inspect_blocks
    from mimc.data import as_source, spec_of

    check_one_process("mimc inspect")
    if dtype not in ENTROPY_DTYPES:
        raise ConfigError(f"unknown entropy dtype '{dtype}': choose one of {', '.join(ENTROPY_DTYPES)}", option="dtype")
    if not whole(hist_bins) or not 2 <= hist_bins <= 1 << 24:  # bounded: 2e9 bins once tried to allocate 15 GB
        raise ConfigError(f"hist_bins must be in [2, {1 << 24}], got {hist_bins!r}", option="hist_bins")
    check_batch_size(batch_size)
    if not whole(seed) or seed < 0:  # else a TypeError from torch's generator, after the data-free scores
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}", option="seed")
    _n_needs_data(n, 256, data)
    if data is None and batch_size != 32:
        raise ConfigError("batch_size sets the forward passes over data and no data is given: drop batch_size or give data",
                          option=("batch_size", "data"))
    if plot is True:
        from mimc.models.resolve import model_slug

        plot = Path(f"{model_slug(str(model))}-blocks.png")
    if plot is not None:
        plot = Path(plot)
        if plot.suffix.lower() != ".png":
            raise BadInputError(f"plot path {plot} does not end in .png: name a .png file")
        if not plot.parent.is_dir():
            raise BadInputError(f"folder {plot.parent} does not exist: create it or choose another plot path")
        _figure()  # a missing matplotlib fails before the work, not after
    encoder = _load(model)
    batches = as_source(data, seed).batches(encoder.config, n, batch_size) if data is not None else None
    result = inspect_blocks(encoder, batches, dtype, hist_bins, int(seed))
    result["model"] = _name(model, None)
    result["data"] = spec_of(data)
    if plot is not None:
        plot_scores(result, plot, f"block scores: {result['model'] or 'model'}")
        result["plot"] = str(plot)
    return InspectReport(result)


def _figure():
    """matplotlib's Figure class: drawn without pyplot, so no display is needed and the caller's
    backend (a notebook's inline one) is left as it was."""
    from mimc.errors import MissingExtraError

    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("the inspect plot needs matplotlib, which is not installed: pip install matplotlib, or skip the plot") from None
    return Figure


def plot_scores(result: dict[str, Any], path: Path, title: str) -> None:
    """Min-max normalised scores per criterion against the block index (PNG), written atomically."""
    ids = result["block_ids"]
    fig = _figure()(figsize=(8, 4.5), dpi=110)
    ax = fig.subplots()
    rho = result.get("spearman_vs_sensitivity", {})
    for name, values in result["scores"].items():
        lo, hi = min(values), max(values)
        norm = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
        label = name if name not in rho or rho[name] is None else f"{name} (ρ={rho[name]:+.2f})"
        style = dict(lw=3, color="black") if name == "sensitivity" else dict(lw=1.3, marker="o", ms=3)
        ax.plot(ids, norm, label=label, **style)
    ax.set_xlabel("block (original index)")
    ax.set_ylabel("score, min-max normalised (low = removed first)")
    ax.set_xticks(ids)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")


__all__ = ["evaluate", "inspect", "EvalReport", "InspectReport"]
