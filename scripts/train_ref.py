"""Pretrain mimc's reference encoder ``ref`` as a masked autoencoder, on CPU, from images in PyPI packages.

    python scripts/train_ref.py --out mimc/models/ref

writes ``ref.safetensors`` (the canonical encoder, fp16), ``builtin.npz`` (the held-out labelled
evaluation set) and ``train_log.json`` (settings, loss curve, wall time, k-NN accuracy of the trained
encoder and of a random-init encoder of the same shape). Seeded; needs scikit-image and scikit-learn
(``pip install mimc[data]``) for the images.

Data
  pre-training: random resized crops (with flips) of scikit-image's sample photographs and
  scikit-learn's two sample photographs, plus the training split of scikit-learn's 8x8 digits
  (upscaled, randomly shifted and scaled). Never seen in pre-training, and shipped as builtin.npz:
  a held-out digits split (30 per class) and 64 px tiles of three texture photographs (brick,
  grass, gravel) that are not in the photo pool.

k-NN protocol (mimc/evaluation.py implements the same): leave-one-out over the labelled set, cosine
similarity of L2-normalised pooled features, k=10 neighbours, votes weighted by exp(sim / 0.07),
top-1 accuracy.

References:
  He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
  https://github.com/facebookresearch/mae (models_mae.py: random_masking, norm_pix_loss, sin-cos pos embed)
  Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
  (the weighted k-NN monitor with temperature 0.07). https://github.com/zhirongw/lemniscate.pytorch
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimc.data import load_images  # noqa: E402
from mimc.models.reference import reference_config  # noqa: E402
from mimc.models.vit import Block, Encoder, EncoderConfig, build_encoder  # noqa: E402

SIZE = 32
PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "clock", "page", "text", "cell", "moon", "logo"]
TEXTURES = ["brick", "grass", "gravel"]  # held out: never in the pre-training pool
DIGITS_PER_CLASS = 30
TILES_PER_TEXTURE = 50


# Images ----------------------------------------------------------------------------------------
def _rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _shrink(img: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Big photos (retina, hubble) to at most 512 px so crop scales mean the same on every photo."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BILINEAR))


def _digit_to_rgb(d8: np.ndarray, side: int = SIZE) -> np.ndarray:
    """sklearn digits are 8x8 with values 0..16; bicubic upscale to side x side, grey -> RGB."""
    u8 = np.clip(d8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return _rgb_uint8(np.asarray(Image.fromarray(u8).resize((side, side), Image.BICUBIC)))


def photo_pool() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    pool = [_shrink(_rgb_uint8(getattr(skimage.data, name)())) for name in PHOTOS]
    left, right, _ = skimage.data.stereo_motorcycle()
    pool += [_shrink(_rgb_uint8(left)), _shrink(_rgb_uint8(right))]
    pool += [_shrink(_rgb_uint8(img)) for img in load_sample_images().images]  # china, flower
    return pool


def digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): DIGITS_PER_CLASS per class held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(np.flatnonzero(digits.target == c), DIGITS_PER_CLASS, replace=False) for c in range(10)])
    train = np.setdiff1d(np.arange(len(digits.target)), held)
    return digits.images[train], digits.target[train], digits.images[np.sort(held)], digits.target[np.sort(held)]


def texture_tiles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping 64 px tiles of the held-out texture photos, resized to 32 px (no two samples share pixels)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(TEXTURES):
        img = _rgb_uint8(getattr(skimage.data, name)())
        tiles = [(y, x) for y in range(0, img.shape[0] - 63, 64) for x in range(0, img.shape[1] - 63, 64)]
        for i in sorted(rng.choice(len(tiles), TILES_PER_TEXTURE, replace=False)):
            y, x = tiles[i]
            images.append(np.asarray(Image.fromarray(img[y : y + 64, x : x + 64]).resize((SIZE, SIZE), Image.BILINEAR)))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def build_builtin(seed: int) -> dict[str, np.ndarray]:
    _, _, held_digits, held_labels = digits_split(seed)
    tex, tex_labels = texture_tiles(seed)
    images = np.concatenate([np.stack([_digit_to_rgb(d) for d in held_digits]), tex])
    labels = np.concatenate([held_labels, tex_labels + 10]).astype(np.int64)
    names = np.asarray([f"digit_{i}" for i in range(10)] + TEXTURES)
    return {"images": images.astype(np.uint8), "labels": labels, "class_names": names}


class CropSampler:
    """Fresh random views every step: resized crops of photos, and shifted/scaled training digits."""

    def __init__(self, photos: list[np.ndarray], digits: np.ndarray, digit_fraction: float, seed: int):
        self.photos = [Image.fromarray(p) for p in photos]
        self.digits = [Image.fromarray(np.clip(d * (255.0 / 16.0), 0, 255).astype(np.uint8)) for d in digits]
        self.digit_fraction = digit_fraction
        self.rng = np.random.default_rng(seed)

    def _photo_crop(self) -> np.ndarray:
        img = self.photos[self.rng.integers(len(self.photos))]
        w, h = img.size
        side = math.exp(self.rng.uniform(math.log(12), math.log(min(w, h))))  # scale-uniform in log space
        aspect = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, side * math.sqrt(aspect)), min(h, side / math.sqrt(aspect))
        x0, y0 = self.rng.uniform(0, w - cw), self.rng.uniform(0, h - ch)
        crop = img.resize((SIZE, SIZE), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)
        out = np.asarray(crop)
        return out[:, ::-1] if self.rng.random() < 0.5 else out

    def _digit(self) -> np.ndarray:
        img = self.digits[self.rng.integers(len(self.digits))]
        side = int(self.rng.integers(24, 37))
        big = np.asarray(img.resize((side, side), Image.BICUBIC))
        canvas = np.zeros((SIZE + 16, SIZE + 16), dtype=np.uint8)
        y, x = self.rng.integers(0, SIZE + 16 - side + 1, size=2)
        canvas[y : y + side, x : x + side] = big
        c = (SIZE + 16 - SIZE) // 2 + self.rng.integers(-3, 4, size=2)
        return _rgb_uint8(canvas[c[0] : c[0] + SIZE, c[1] : c[1] + SIZE])

    def batch(self, n: int) -> np.ndarray:
        return np.stack([self._digit() if self.rng.random() < self.digit_fraction else self._photo_crop() for _ in range(n)])


def to_pixels(batch_u8: np.ndarray, cfg: EncoderConfig) -> torch.Tensor:
    """uint8 NHWC at the model's size -> normalised NCHW (the same normalisation as mimc.data)."""
    x = torch.from_numpy(np.ascontiguousarray(batch_u8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


# MAE -------------------------------------------------------------------------------------------
def sincos_pos_embed(dim: int, side: int, cls_token: bool) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding (half the channels per axis)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")

    def axis(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([axis(ys), axis(xs)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float()[None]


class MaeDecoder(nn.Module):
    """MAE's light decoder (training only): embed visible tokens, add mask tokens, predict patch pixels."""

    def __init__(self, enc_cfg: EncoderConfig, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        side = enc_cfg.image_size // enc_cfg.patch_size
        block_cfg = EncoderConfig(image_size=enc_cfg.image_size, patch_size=enc_cfg.patch_size, dim=dim, depth=depth,
                                  num_heads=heads, mlp_dim=4 * dim)
        self.embed = nn.Linear(enc_cfg.dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_pos_embed(dim, side, cls_token=True))
        self.blocks = nn.ModuleList(Block(block_cfg, i) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, enc_cfg.patch_size**2 * enc_cfg.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        b, n_vis, d = x.shape
        n = restore.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n + 1 - n_vis, d)], dim=1)
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, d))  # back to raster order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


def patchify(pixels: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(encoder: Encoder, decoder: MaeDecoder, pixels: torch.Tensor, mask_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Encode a random 25 % of the patches with the canonical encoder's own modules, reconstruct the rest."""
    cfg = encoder.config
    x = encoder.patch_embed(pixels) + encoder.pos_embed[:, 1:]
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    shuffle = torch.rand(b, n, generator=gen).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in encoder.blocks:
        x = block(x)
    pred = decoder(encoder.norm(x), restore)
    target = patchify(pixels, cfg.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()  # norm_pix_loss
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def init_for_mae(encoder: Encoder) -> None:
    """MAE's init: xavier-uniform linears, fixed sin-cos position embedding (frozen during training)."""
    for m in encoder.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = encoder.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    side = encoder.config.image_size // encoder.config.patch_size
    with torch.no_grad():
        encoder.pos_embed.copy_(sincos_pos_embed(encoder.config.dim, side, cls_token=True))
    encoder.pos_embed.requires_grad_(False)


# Evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(encoder: Encoder, pixels: torch.Tensor, batch: int = 128) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(pixels[i : i + batch]).pooled for i in range(0, len(pixels), batch)])


def knn_top1(features: torch.Tensor, labels: np.ndarray, k: int = 10, temperature: float = 0.07) -> float:
    """Leave-one-out weighted k-NN: cosine similarity, k neighbours, votes exp(sim / T), top-1 accuracy."""
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)  # leave one out
    top_sim, top_idx = sim.topk(min(k, len(f) - 1), dim=1)
    y = torch.as_tensor(labels, dtype=torch.long)
    votes = torch.zeros(len(f), int(y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, y[top_idx], (top_sim / temperature).exp())
    return float((votes.argmax(1) == y).double().mean())


def evaluate(encoder: Encoder, builtin_path: Path, cfg: EncoderConfig) -> dict[str, float]:
    data = load_images(builtin_path, cfg)
    feats = pooled_features(encoder, data.pixels)
    digits = data.labels < 10
    return {
        "knn_top1": knn_top1(feats, data.labels),
        "knn_top1_digits": knn_top1(feats[torch.from_numpy(digits)], data.labels[digits]),
        "knn_top1_textures": knn_top1(feats[torch.from_numpy(~digits)], data.labels[~digits]),
    }


def eval_only(out: Path, seed: int) -> int:
    """k-NN of the shipped weights, loaded exactly as mimc loads them (fp16 file -> fp32), vs random init."""
    from safetensors.torch import load_file

    cfg = reference_config()
    encoder = Encoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in load_file(str(out / "ref.safetensors")).items()})
    trained = evaluate(encoder, out / "builtin.npz", cfg)
    random = evaluate(build_encoder(cfg, seed=seed + 1), out / "builtin.npz", cfg)
    print("| encoder | k-NN top-1 (all 13 classes) | digits (10) | textures (3) |")
    print("| --- | --- | --- | --- |")
    for name, m in (("ref (shipped weights)", trained), ("random init, same shape", random)):
        print(f"| {name} | {m['knn_top1']:.3f} | {m['knn_top1_digits']:.3f} | {m['knn_top1_textures']:.3f} |")
    return 0


# Training --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for ref.safetensors, builtin.npz, train_log.json")
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps (timing: docs/ref.md)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--digit-fraction", type=float, default=0.4, help="share of each batch drawn from training digits")
    ap.add_argument("--decoder-dim", type=int, default=96)
    ap.add_argument("--decoder-depth", type=int, default=4, help="MAE: a deeper decoder leaves the encoder's last blocks less specialised for reconstruction")
    ap.add_argument("--max-minutes", type=float, default=30.0,
                    help="safety stop on a busy machine: save what there is after this long (recorded in the log)")
    ap.add_argument("--eval-only", action="store_true",
                    help="train nothing: k-NN of the weights in --out (fp16, as shipped) and of a random-init encoder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0, help="k-NN on builtin every N steps (0: only at the end)")
    args = ap.parse_args(argv)
    command = "python scripts/train_ref.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(command, flush=True)

    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.eval_only:
        return eval_only(args.out, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # The held-out set first: the evaluation reads it through mimc.data exactly as users will.
    builtin_path = args.out / "builtin.npz"
    builtin = build_builtin(args.seed)
    tmp = args.out / ".builtin.tmp.npz"
    np.savez_compressed(tmp, **builtin)
    tmp.replace(builtin_path)

    cfg = reference_config()
    encoder = build_encoder(cfg, seed=args.seed)
    init_for_mae(encoder)
    decoder = MaeDecoder(cfg, dim=args.decoder_dim, depth=args.decoder_depth)
    train_digits, _, _, _ = digits_split(args.seed)
    sampler = CropSampler(photo_pool(), train_digits, args.digit_fraction, args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    params = [p for p in list(encoder.parameters()) + list(decoder.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases, norms, cls/mask tokens: no weight decay (as MAE)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    # Two untrained baselines: mimc's default random init, and this run's own starting point (step 0).
    random_metrics = evaluate(build_encoder(cfg, seed=args.seed + 1), builtin_path, cfg)
    print(f"random-init k-NN: {random_metrics}", flush=True)
    log: list[dict] = []
    evals: list[dict] = [{"step": 0, **evaluate(encoder, builtin_path, cfg)}]
    print(f"step-0 (MAE init) k-NN: {evals[0]}", flush=True)
    start = time.perf_counter()
    running = 0.0
    steps_done = 0
    for step in range(args.steps):
        if time.perf_counter() - start > args.max_minutes * 60:
            print(f"stopping early at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
        encoder.train()
        decoder.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        pixels = to_pixels(sampler.batch(args.batch), cfg)
        loss = mae_loss(encoder, decoder, pixels, args.mask_ratio, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        steps_done = step + 1
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            elapsed = time.perf_counter() - start
            log.append({"step": step + 1, "loss": running / n, "lr": lr_at(step), "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{args.steps} loss {running / n:.4f} lr {lr_at(step):.2e} "
                  f"{(step + 1) / elapsed:.2f} steps/s", flush=True)
            running = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evals.append({"step": step + 1, **evaluate(encoder, builtin_path, cfg)})
            print(f"eval {evals[-1]}", flush=True)
    train_seconds = time.perf_counter() - start

    encoder.pos_embed.requires_grad_(True)
    encoder.eval()
    metrics = evaluate(encoder, builtin_path, cfg)
    evals.append({"step": steps_done, **metrics})
    print(f"trained k-NN: {metrics}", flush=True)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in encoder.state_dict().items()}
    weights = args.out / "ref.safetensors"
    tmp = args.out / ".ref.tmp.safetensors"
    save_file(state, str(tmp), metadata={"format": "pt", "dtype": "float16", "family": "ref"})
    tmp.replace(weights)
    record = {
        "command": command,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "encoder_config": cfg.to_dict(),
        "decoder": {"dim": args.decoder_dim, "depth": args.decoder_depth, "heads": 4},
        "steps_done": steps_done,
        "pretraining_data": {"skimage_photos": PHOTOS + ["stereo_motorcycle (left, right)"],
                             "sklearn_sample_images": ["china.jpg", "flower.jpg"],
                             "sklearn_digits_train_images": int(len(train_digits)),
                             "digit_fraction": args.digit_fraction},
        "builtin": {"digits_held_out_per_class": DIGITS_PER_CLASS, "textures": TEXTURES,
                    "tiles_per_texture": TILES_PER_TEXTURE, "n": int(len(builtin["labels"]))},
        "knn_protocol": "leave-one-out, cosine of L2-normalised pooled features, k=10, weights exp(sim/0.07), top-1",
        "knn_trained": metrics,
        "knn_random_init": random_metrics,
        "knn_step0_mae_init": evals[0],
        "evals": evals,
        "train_seconds": round(train_seconds, 1),
        "steps_per_second": round(steps_done / train_seconds, 3),
        "loss_curve": log,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    tmp = args.out / ".train_log.tmp.json"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out / "train_log.json")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB), {builtin_path}, {args.out / 'train_log.json'}")
    print(f"train time {train_seconds / 60:.1f} min; k-NN top-1 trained {metrics['knn_top1']:.3f} "
          f"vs random-init {random_metrics['knn_top1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
