"""OPTIN trajectory scores for heads and MLP neurons, and a global per-block width allocation under a MAC budget.

OPTIN (Khaki & Plataniotis, "The Need for Speed: Pruning Transformers with One Recipe", ICLR 2024;
code: https://github.com/Skhaki18/optin-transformer-pruning) scores every attention head and MLP
neuron by removing it alone and measuring how far the features of the *later* layers move, from
one batch of calibration data and without retraining; a global search then spends a MAC budget on
the best heads and neurons.

Scoring (:func:`optin_scores`). For unit u in block l, with F the per-token features at a layer:

    score(u) = Σ_{j ≥ l} ‖F̂ₜ F̂ₜᵀ − F̂ₛ F̂ₛᵀ‖²_F  +  w · ‖P̂ₜ P̂ₜᵀ − P̂ₛ P̂ₛᵀ‖²_F

F̂ is F normalised per token, over a fixed sample of K = 768 tokens (the upstream manifold-
distillation term, ``prune/loss_components.py::manifold_Distillation``); t is the dense model, s
the model without u. Where mimc follows upstream:
- the features compared are the inputs of each later block's first LayerNorm *after* that norm
  (upstream's ``embedding_choice: layernorm_before`` for vision), i.e. the output of blocks l..L-1
  seen through the next norm (the final norm for the last block), so the unit's own block counts;
- the sum over later layers and K = 768 sampled tokens, sum aggregation (``aggregate: sum``);
- the second term takes the part of upstream's logit KL. An MIM encoder has no classifier head, so
  the pooled features stand in: the relational (sample-by-sample) Gram of the normalised pooled
  features of the batch, which is what retrieval / k-NN read. Upstream rescales the KL by a power of
  ten so that it sits ``lambda_contribution`` (10) below the MD term; mimc uses the same ratio but
  sets w once per unit kind, ``w = mean(MD) / mean(pooled) / λ`` (deterministic, no running mean).
Where mimc differs, and why:
- upstream multiplies each score by a geometric weight of the unit's *index* (1..100 over neurons,
  1..10 over heads, ``expFunction1``) and by ad-hoc decays (heads 0.5, last layer 0.5). Unit order
  in a pre-trained layer carries no meaning, so mimc drops the index weight and the decays: heads and
  neurons are compared in the same loss units.
- upstream's head loop never restores the mask of a finished layer (``FullHeadMasking[layer]`` keeps
  its last head masked while later layers are scored); mimc masks exactly one unit at a time.
- upstream samples fresh random tokens at every comparison; mimc draws one seeded sample per batch
  (shared by every unit), so scores are deterministic and less noisy.
- statistics stream: the score sums over calibration batches (upstream: one batch of 128).
- ``trajectory='final'`` (not upstream, an ablation): the last block's MD term instead of the sum.
  The sum counts an early unit's effect once per later block, so early blocks win most of the
  budget (benchmarks/ref_optin_table.py shows how far).
Removing a unit is computed exactly and cheaply at its own block: a neuron's removal subtracts
``h_j · fc2[:, j]`` from the MLP output, a head's removal subtracts its slice of the projection;
only the blocks after it are re-run, with many units stacked along the batch dimension.

Allocation (:func:`allocate`), after upstream ``prune/main_prune.py::globalRankingLanguage``: heads
are ranked globally; for every number of kept heads the remaining MACs are filled with the best
neurons and the split with the largest total importance wins. mimc's neurons are taken in tiles of
``round_to`` (the best ``round_to`` of a block at a time, GEMM-friendly widths), every block keeps at
least one head and one tile, and the result is within one tile's MACs below the budget. With the
``l2`` / ``activation`` scores (not losses, so heads and neurons are not on one scale) each kind is
first normalised to the same mean importance per MAC.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mimc.errors import ConfigError
from mimc.models.vit import Encoder, flops_per_image

MD_TOKENS = 768  # K, the upstream token sample of the manifold-distillation term
VARIANT_ROWS = 256  # images (units × batch) run through the later blocks at once
TRAJECTORIES = ("sum", "final")


def unit_macs(cfg) -> tuple[float, float]:
    """MACs of one attention head and of one MLP neuron (every block sees the same tokens)."""
    n, d, hd = cfg.num_tokens, cfg.dim, cfg.attn_head_dim
    return float(n * d * 3 * hd + n * hd * d + 2 * n * n * hd), float(2 * n * d)


def _features(encoder: Encoder, j: int, x: torch.Tensor) -> torch.Tensor:
    """Output of block j seen through the next norm (the final norm after the last block)."""
    nxt = encoder.blocks[j + 1].norm1 if j + 1 < len(encoder.blocks) else encoder.norm
    return F.normalize(nxt(x).float(), dim=-1)


def _gram_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """‖T Tᵀ − S Sᵀ‖²_F per variant; teacher (K, D), student (P, K, D) -> (P,)."""
    diff = student @ student.transpose(1, 2) - (teacher @ teacher.T)[None]
    return diff.pow(2).sum(dim=(1, 2))


class _BatchReference:
    """The dense model's per-block states and reference features on one batch."""

    def __init__(self, encoder: Encoder, pixels: torch.Tensor, generator: torch.Generator):
        self.bias = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
        x = encoder.embed(pixels)
        b, n, _ = x.shape
        self.token_idx = torch.randperm(b * n, generator=generator)[:MD_TOKENS]
        self.mid, self.out, self.heads_out, self.hidden, self.feats = [], [], [], [], []
        for j, block in enumerate(encoder.blocks):
            captured = {}
            with (block.attn.proj.register_forward_hook(lambda m, i, o: captured.__setitem__("o", i[0])),
                  block.mlp.fc2.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0]))):
                mid = x + block.ls1(block.attn(block.norm1(x), self.bias))
                x = mid + block.ls2(block.mlp(block.norm2(mid)))
            self.mid.append(mid)
            self.out.append(x)
            self.heads_out.append(captured["o"])
            self.hidden.append(captured["h"])
            self.feats.append(self.sample(_features(encoder, j, x)))
        self.pooled = F.normalize(encoder.pool(encoder.norm(x)).float(), dim=-1)

    def sample(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., B, N, D) -> (..., K, D): the fixed token sample."""
        return feats.reshape(*feats.shape[:-3], -1, feats.shape[-1])[..., self.token_idx, :]


@torch.no_grad()
def _trajectory_losses(encoder: Encoder, ref: _BatchReference, l: int, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per variant: the MD term summed over blocks l.., the last block's MD term alone, the pooled
    term; ``out`` (P, B, N, D) is the perturbed output of block l."""
    p, b, n, d = out.shape
    md = last = _gram_loss(ref.feats[l], ref.sample(_features(encoder, l, out)))
    x = out.reshape(p * b, n, d)
    for j in range(l + 1, len(encoder.blocks)):
        x = encoder.blocks[j](x, ref.bias)
        last = _gram_loss(ref.feats[j], ref.sample(_features(encoder, j, x.reshape(p, b, n, d))))
        md = md + last
    pooled = F.normalize(encoder.pool(encoder.norm(x)).float(), dim=-1).reshape(p, b, -1)
    return {"md": md, "final": last, "pool": _gram_loss(ref.pooled, pooled)}


@torch.no_grad()
def _score_block(encoder: Encoder, ref: _BatchReference, l: int, terms: dict) -> None:
    """Add block l's per-head and per-neuron losses on this batch into the accumulators."""
    block = encoder.blocks[l]
    b = ref.out[l].shape[0]
    chunk = max(1, VARIANT_ROWS // b)
    # Neurons: removing j subtracts h_j * fc2[:, j] from the MLP output (bias unchanged).
    h, w2 = ref.hidden[l], block.mlp.fc2.weight
    width = h.shape[-1]
    for s in range(0, width, chunk):
        idx = torch.arange(s, min(s + chunk, width))
        delta = h[..., idx].permute(2, 0, 1)[..., None] * w2[:, idx].T[:, None, None, :]  # (P, B, N, D)
        for key, value in _trajectory_losses(encoder, ref, l, ref.out[l][None] - block.ls2(delta)).items():
            terms[key][0][l][idx] += value
    # Heads: removing h subtracts its slice of the projection; block l's MLP is re-run.
    attn = block.attn
    o = ref.heads_out[l].reshape(*ref.heads_out[l].shape[:2], attn.num_heads, attn.head_dim)
    wp = attn.proj.weight.reshape(-1, attn.num_heads, attn.head_dim)
    for s in range(0, attn.num_heads, chunk):
        idx = torch.arange(s, min(s + chunk, attn.num_heads))
        delta = torch.einsum("bnhe,dhe->hbnd", o[:, :, idx], wp[:, idx])
        mid = ref.mid[l][None] - block.ls1(delta)
        out = mid + block.ls2(block.mlp(block.norm2(mid)))
        for key, value in _trajectory_losses(encoder, ref, l, out).items():
            terms[key][1][l][idx] += value


def optin_scores(encoder: Encoder, batches: list[torch.Tensor], lam: float = 10.0, seed: int = 0, trajectory: str = "sum"):
    """Per block: (neuron scores (mlp_dim,), head scores (heads,)); larger = more important.
    ``trajectory``: ``sum`` (the paper) or ``final`` (the ablation; see the module doc)."""
    if trajectory not in TRAJECTORIES:
        raise ConfigError(f"unknown OPTIN trajectory '{trajectory}': choose one of {', '.join(TRAJECTORIES)}")
    terms = optin_terms(encoder, batches, seed)
    md = terms["md" if trajectory == "sum" else "final"]
    return list(zip(_combine(md[0], terms["pool"][0], lam), _combine(md[1], terms["pool"][1], lam)))


@torch.no_grad()
def optin_terms(encoder: Encoder, batches: list[torch.Tensor], seed: int = 0) -> dict[str, tuple[list, list]]:
    """The loss terms (``md``, ``final``, ``pool``), each (per-block neuron terms, per-block head terms),
    summed over the batches."""
    if not batches:
        raise ConfigError("width criterion 'optin' measures the effect of each unit on images: give data (a folder, .npz/.npy or 'builtin')",
                          option="data")
    if encoder.config.token_schedule:
        raise ConfigError("OPTIN scores a model without token reduction: apply width pruning before the tokens stage")
    if any(x.shape[0] < 2 for x in batches):
        raise ConfigError("OPTIN's pooled term compares images with each other: calibration batches need >= 2 images")
    if next(encoder.parameters()).dtype != torch.float32:
        encoder = copy.deepcopy(encoder).float()  # scores in float32; the caller's model stays as it is
    blocks = encoder.blocks
    terms = {key: ([torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64) for b in blocks],
                   [torch.zeros(b.attn.num_heads, dtype=torch.float64) for b in blocks]) for key in ("md", "final", "pool")}
    generator = torch.Generator().manual_seed(seed)
    for pixels in batches:  # streamed: one batch's states in memory at a time
        ref = _BatchReference(encoder, pixels.float(), generator)
        for l in range(len(blocks)):
            _score_block(encoder, ref, l, terms)
    return terms


def _combine(md: list[torch.Tensor], pool: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """MD + w·pooled with w putting the pooled term λ below the MD term on average (see module doc)."""
    md_mean, pool_mean = float(torch.cat(md).mean()), float(torch.cat(pool).mean())
    w = md_mean / pool_mean / lam if pool_mean > 0 and lam > 0 else 0.0
    return [(m + w * p).float() for m, p in zip(md, pool)]


# Global allocation under a MAC budget ------------------------------------------------------------------
def ranked(scores: torch.Tensor) -> list[int]:
    """Unit indices from the highest score down; ties broken by index, so the same scores always give
    the same structure."""
    return sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))


def allocate(cfg, scores, macs_ratio: float, round_to: int, prune_heads: bool = True,
             normalise: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Per block (kept neuron indices, kept head indices), sorted, meeting ``macs_ratio`` of the dense MACs.

    ``scores``: per block (neuron scores, head scores). ``normalise``: put heads and neurons on one
    scale first (same mean importance per MAC), for scores that are not losses (l2, activation).
    """
    if cfg.token_schedule:
        raise ConfigError("macs allocates widths on a model without token reduction: apply width pruning before the tokens stage", option="macs")
    head_mac, neuron_mac = unit_macs(cfg)
    base = flops_per_image(cfg)
    budget = macs_ratio * base
    neurons = [s[0].double() for s in scores]
    heads = [s[1].double() for s in scores]
    if normalise:
        per_mac_n = float(torch.cat(neurons).sum()) / (sum(t.numel() for t in neurons) * neuron_mac)
        per_mac_h = float(torch.cat(heads).sum()) / (sum(t.numel() for t in heads) * head_mac)
        if per_mac_h > 0 and per_mac_n > 0:
            heads = [t * (per_mac_n / per_mac_h) for t in heads]
    # Tiles: each block's neurons in score order, round_to at a time (tile scores fall within a block).
    tiles, keep_heads, opt_heads = [], [], []
    for i, (ns, hs) in enumerate(zip(neurons, heads)):
        order = ranked(ns)
        tiles.append([(order[k : k + round_to], float(ns[order[k : k + round_to]].sum())) for k in range(0, len(order), round_to)])
        h_order = ranked(hs)
        if not prune_heads:
            keep_heads.append(list(h_order))
            continue
        keep_heads.append(h_order[:1])  # every block keeps one head
        opt_heads += [(float(hs[h]), i, h) for h in h_order[1:]]
    opt_heads.sort(key=lambda t: (-t[0], t[1], t[2]))
    fixed = base - sum(head_mac * s[1].numel() + neuron_mac * s[0].numel() for s in scores)
    floor = fixed + head_mac * sum(len(k) for k in keep_heads) + neuron_mac * sum(len(t[0][0]) for t in tiles)
    if floor > budget + 1e-6 * base:
        raise ConfigError(f"macs {macs_ratio} is below the smallest model this allocation keeps (one head and one "
                          f"{round_to}-neuron tile per block: x{floor / base:.3f}): raise macs or lower round_to", option=("macs", "round_to"))
    opt_tiles = sorted(((t[1], i, k) for i, ts in enumerate(tiles) for k, t in enumerate(ts) if k > 0), key=lambda t: (-t[0], t[1], t[2]))
    best = None
    for n_heads in range(len(opt_heads) + 1):
        left = budget - floor - head_mac * n_heads
        if left < 0:
            break
        total = sum(h[0] for h in opt_heads[:n_heads])
        taken = [1] * len(tiles)
        for score, i, k in opt_tiles:  # greedy, each block's tiles in order (prefixes)
            size = len(tiles[i][k][0]) * neuron_mac
            if k == taken[i] and size <= left:
                taken[i] += 1
                left -= size
                total += score
        if best is None or total > best[0]:
            best = (total, n_heads, taken)
    _, n_heads, taken = best
    for _, i, h in opt_heads[:n_heads]:
        keep_heads[i].append(h)
    keep_neurons = [sorted(j for t in ts[: taken[i]] for j in t[0]) for i, ts in enumerate(tiles)]
    return keep_neurons, [sorted(k) for k in keep_heads]


__all__ = ["optin_scores", "optin_terms", "allocate", "ranked", "unit_macs", "MD_TOKENS", "TRAJECTORIES"]
