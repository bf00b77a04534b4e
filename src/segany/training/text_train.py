"""Training the text head: the projection from sentence vectors to prompt tokens, and a copy of the mask
decoder fine-tuned to read them, on a frozen image encoder (embeddings cached on disk).

    segany train-text --config configs/text_default.yaml

Each step draws ``batch_size`` images, up to ``queries_per_image`` of their queries, a random wording of
each (synonyms and templates for categories, attribute phrases for synthetic shapes), and trains the
single-mask output against the union of what the query names with SAM's focal + dice + IoU-MSE loss. A
share of the queries (``point_prob``) also gets one positive click inside the target, so text and points
combine. The loop, the run folder and the option loading are SAM training's
(:class:`~segany.training.loop.TrainLoop`, :class:`~segany.training.run_files.RunFolder`,
:class:`~segany.training.config.Options`). Checkpoints (``out_dir/last.pt``: head, optimizer, step,
RNG) are written atomically; a rerun resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segany.checkpoint_text import load_text_head, new_text_head, save_text_head
from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_json
from segany.modeling.text_encoder import load_sentence_encoder
from segany.modeling.text_prompt import TextHeadConfig
from segany.text.phrases import attribute_phrase, category_phrase, wordings
from segany.training.config import PRECISIONS, Options
from segany.training.distributed import autocast, resolve_autocast
from segany.training.embeddings_cache import CachedEmbeddingDataset, build_embedding_cache, encoder_input
from segany.training.loop import Every, LogWindow, TrainLoop
from segany.training.losses import LossConfig, sam_mask_loss
from segany.training.optim import build_cosine_scheduler
from segany.training.run_files import RunFolder
from segany.training.text_data import TextItemDataset, build_source

#: What a text-head run writes directly in ``out_dir``.
TEXT_RUN_FILES = ("last.pt", "metrics.jsonl", "config.json", "text_head.safetensors")


@dataclass
class TextTrainConfig(Options):
    """The text head's training options (``configs/text_default.yaml``)."""

    out_dir: str = "runs/text"
    base_model: str = "default"
    #: a text head file to start from instead of a fresh head: fine-tuning after the base model's weights
    #: changed (its architecture options must match the ones below)
    init_head: str | None = None
    sentence_encoder: str = "all-MiniLM-L6-v2"
    num_tokens: int = 4
    hidden_dim: int = 256
    dense_bias: bool = True
    pixel_width: int = 16
    train_data: list[dict] = field(default_factory=list)
    data_weights: list[float] = field(default_factory=list)  #: sampling weight per train_data entry
    max_queries: int = 32
    steps: int = 1000
    batch_size: int = 8
    queries_per_image: int = 8
    min_target_pixels: int = 2  #: queries whose low-res target is smaller are skipped
    point_prob: float = 0.2
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    focal_weight: float = 10.0
    dice_weight: float = 1.0
    ckpt_every: int = 100
    log_every: int = 20
    seed: int = 0
    num_threads: int | None = None
    cache_dir: str | None = None  #: image embeddings (default: out_dir/embeddings)
    precision: str = "auto"  #: autocast of the head's forward: auto (bf16 on CUDA with bf16) | bf16 | fp32

    def validate(self) -> None:
        if not self.train_data:
            raise SegAnyError("train_data is empty")
        if self.precision not in PRECISIONS:
            raise SegAnyError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.data_weights and len(self.data_weights) != len(self.train_data):
            raise SegAnyError("data_weights needs one weight per train_data entry")


def _wording(query: str | dict, rng: np.random.Generator) -> str:
    return attribute_phrase(query, rng) if isinstance(query, dict) else category_phrase(query, rng)


class _Packed:
    """One training image's cached item, kept small: the embedding (float16), the content's pixels as a PNG
    (lossless), the targets bit-packed. A run holds one for every image, so packing halves its RAM (MODELS.md,
    the text head's section); unpacking a step's few images is cheap next to the step."""

    def __init__(self, item: dict[str, Any], embedding: torch.Tensor) -> None:
        self.embedding = embedding
        self.valid_hw = item["valid_hw"]
        self.size = int(item["image"].shape[-1])
        vh, vw = (int(v) for v in self.valid_hw)
        ok, png = cv2.imencode(".png", item["image"][:, :vh, :vw].permute(1, 2, 0).numpy(),
                               [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise SegAnyError("could not encode a training image in memory")
        self.png = png
        self.side = int(item["targets"].shape[-1])
        self.bits = np.packbits(item["targets"].numpy(), axis=-1)
        self.valid = item["valid"]
        self.queries = item["queries"]

    def image(self) -> torch.Tensor:
        """``3 x S x S`` uint8, zero outside the content (what encoder_input zeroes anyway)."""
        hwc = cv2.imdecode(self.png, cv2.IMREAD_UNCHANGED)
        out = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        out[:, : hwc.shape[0], : hwc.shape[1]] = torch.from_numpy(hwc).permute(2, 0, 1)
        return out

    def target(self, j: int) -> torch.Tensor:
        """Query ``j``'s ``L x L`` bool target."""
        return torch.from_numpy(np.unpackbits(self.bits[j], axis=-1, count=self.side).astype(bool))


class _Usable(torch.utils.data.Dataset):
    """A cached text item with only the queries whose low-res target is large enough (``None``: none is)."""

    def __init__(self, ds: TextItemDataset, cached: CachedEmbeddingDataset, min_pixels: int) -> None:
        self.ds, self.cached, self.min_pixels = ds, cached, min_pixels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> _Packed | None:
        it = self.ds[i]
        keep = [j for j in range(len(it["queries"])) if int(it["targets"][j].sum()) >= self.min_pixels]
        if not keep:
            return None
        kept = dict(it, targets=it["targets"][keep], queries=[it["queries"][j] for j in keep])
        return _Packed(kept, self.cached.embedding(i))


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _own(item: _Packed) -> _Packed:
    # a worker's tensors live in shared memory; the run keeps thousands of them, so they move to its own
    item.embedding, item.valid_hw, item.valid = item.embedding.clone(), item.valid_hw.clone(), item.valid.clone()
    return item


class _Data:
    """Cached embeddings + low-res targets of every training image, in memory."""

    def __init__(self, cfg: TextTrainConfig, model, device: torch.device) -> None:
        s = model.image_size
        cache_root = Path(cfg.cache_dir or Path(cfg.out_dir) / "embeddings")
        # decoding the images and label maps again is the slow part of a start: one worker per thread
        workers = max(1, cfg.num_threads or torch.get_num_threads())
        self.sets = []
        for spec in cfg.train_data:
            ds = TextItemDataset(build_source(spec, s), s, cfg.max_queries)
            desc = f"text:{json.dumps(spec, sort_keys=True)}:{s}:{cfg.max_queries}"
            # one folder per data spec (not per position in the list), so runs with other mixes share it
            folder = cache_root / hashlib.sha256(desc.encode()).hexdigest()[:16]
            fp = build_embedding_cache(model, ds, folder, desc, device=device, dtype="float16")
            usable = _Usable(ds, CachedEmbeddingDataset(ds, folder, fp), cfg.min_target_pixels)
            loader = torch.utils.data.DataLoader(
                usable, batch_size=1, collate_fn=_first, num_workers=workers if len(ds) > 1 else 0
            )
            items = [_own(it) for it in loader if it is not None]
            if not items:
                raise SegAnyError(f"text data {spec}: no image has a usable query")
            self.sets.append(items)
        w = np.asarray(cfg.data_weights or [len(x) for x in self.sets], dtype=np.float64)
        self.weights = w / w.sum()


def _sample_point(target: torch.Tensor, rng: np.random.Generator, scale: float) -> list[float]:
    ys, xs = torch.nonzero(target, as_tuple=True)
    j = int(rng.integers(len(ys)))
    return [(float(xs[j]) + 0.5) * scale, (float(ys[j]) + 0.5) * scale]


class _TextStep:
    """A step's host-side draws (:meth:`batch`, from the run's ``rng``) and its loss (:meth:`forward`)."""

    def __init__(self, cfg: TextTrainConfig, model, head, data: _Data, vectors: dict[str, torch.Tensor],
                 rng: np.random.Generator, device: torch.device) -> None:
        self.cfg, self.model, self.head, self.data = cfg, model, head, data
        self.vectors, self.rng, self.device = vectors, rng, device
        self.loss_cfg = LossConfig(focal_weight=cfg.focal_weight, dice_weight=cfg.dice_weight)
        self.pe = model.prompt_encoder.get_dense_pe()
        self.autocast_dtype = resolve_autocast(cfg.precision, device)
        self.scale = model.image_size / (4 * model.prompt_encoder.image_embedding_size[0])

    def batch(self, step: int) -> dict[str, Any]:
        cfg, rng, data = self.cfg, self.rng, self.data
        picked, owner, texts, gts, valids, points = [], [], [], [], [], []
        for b in range(cfg.batch_size):
            items = data.sets[int(rng.choice(len(data.sets), p=data.weights))]
            it = items[int(rng.integers(len(items)))]
            picked.append(it)
            k = len(it.queries)
            for j in rng.choice(k, size=min(k, cfg.queries_per_image), replace=False):
                owner.append(b)
                texts.append(self.vectors[_wording(it.queries[j], rng)])
                gts.append(it.target(j))
                valids.append(it.valid)
                points.append(
                    _sample_point(gts[-1], rng, self.scale) if rng.random() < cfg.point_prob else None
                )
        return {"picked": picked, "owner": owner, "texts": texts, "gts": gts, "valids": valids, "points": points}

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.autocast_dtype):
            logits, ious, order = self._decode(batch)
        gt = torch.stack([batch["gts"][i] for i in order]).to(self.device)
        valid = torch.stack([batch["valids"][i] for i in order]).to(self.device)
        losses = sam_mask_loss(logits, ious, gt, valid, self.loss_cfg)  # in float32 whatever the autocast
        return {"loss": losses["loss"].mean(), "iou": losses["iou"].mean().detach()}

    def _decode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Mask logits and predicted IoUs of every query, in the order returned (prompt-free ones first)."""
        model, head, device = self.model, self.head, self.device
        picked, points = batch["picked"], batch["points"]
        # float16 cache entries are cast one by one: CPU autocast has no rule for stacking float16
        emb = torch.stack([it.embedding.float() for it in picked]).to(device)
        x = encoder_input(model, torch.stack([it.image() for it in picked]).to(device),
                          torch.stack([it.valid_hw for it in picked]))
        pixel = head.image_features(x)
        text = torch.stack(batch["texts"]).to(device)
        owner_t = torch.tensor(batch["owner"], device=device)
        with_pt = [i for i, p in enumerate(points) if p is not None]
        without = [i for i, p in enumerate(points) if p is None]
        logits = torch.empty(0, device=device)
        ious = torch.empty(0, device=device)
        order = without + with_pt
        for idx, pts in ((without, None), (with_pt, True)):
            if not idx:
                continue
            if pts is None:
                sparse, dense = model.prompt_encoder(None, None, None)
            else:
                c = torch.tensor([points[i] for i in idx], device=device)[:, None, :]
                lab = torch.ones(len(idx), 1, dtype=torch.int, device=device)
                sparse, dense = model.prompt_encoder((c, lab), None, None)
            rows = owner_t[idx]
            feats = None if pixel is None else tuple(p[rows] for p in pixel)
            lo, io_ = head.decode(text[idx], emb[rows], self.pe, sparse, dense, feats)
            logits = torch.cat([logits, lo]) if logits.numel() else lo
            ious = torch.cat([ious, io_]) if ious.numel() else io_
        return logits, ious, order


def train_text_head(cfg: TextTrainConfig, progress: bool = True) -> Path:
    """Train; returns the path of the exported head (``out_dir/text_head.safetensors``)."""
    from segany.checkpoint import load_model

    # -- setup --
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    folder = RunFolder(cfg.out_dir, TEXT_RUN_FILES)
    folder.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.base_model, device=device, text_head=None).requires_grad_(False)
    encoder = load_sentence_encoder(cfg.sentence_encoder)
    head_cfg = TextHeadConfig(
        cfg.sentence_encoder, encoder.dim, cfg.num_tokens, cfg.hidden_dim, cfg.dense_bias, cfg.pixel_width
    )
    if cfg.init_head:
        head = load_text_head(cfg.init_head, model, check_base=False)
        if head.config != head_cfg:
            raise SegAnyError(f"init_head {cfg.init_head}: its options {head.config.to_dict()} differ from the "
                              f"run's {head_cfg.to_dict()}")
    else:
        head = new_text_head(model, head_cfg)
    head = head.train().requires_grad_(True)
    t0 = time.time()
    data = _Data(cfg, model, device)
    queries = {json.dumps(q, sort_keys=True) if isinstance(q, dict) else q: q
               for items in data.sets for it in items for q in it.queries}
    phrases = sorted({w for q in queries.values() for w in wordings(q)})
    vectors = {}
    for i in range(0, len(phrases), 256):
        chunk = phrases[i : i + 256]
        vectors.update(zip(chunk, encoder.encode(chunk)))
    if progress:
        print(f"data: {[len(s) for s in data.sets]} images, {len(queries)} queries, {len(phrases)} wordings, "
              f"{time.time() - t0:.0f} s", flush=True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)

    # -- resume --
    step = 0
    state = folder.load_last()
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        rng.bit_generator.state = json.loads(state["rng"])
        if progress:
            print(f"resumed from {folder.last} at step {step}", flush=True)
    atomic_write_json(folder.path / "config.json", cfg.to_dict(), indent=2)
    folder.log.truncate_after(step)

    # -- loop --
    def checkpoint(at: int) -> None:
        folder.save_last({"head": head.state_dict(), "opt": opt.state_dict(), "step": at,
                          "rng": json.dumps(rng.bit_generator.state)})

    def log(window: LogWindow) -> None:
        rec = {"step": window.step, "loss": float(window.last["loss"]), "iou": float(window.last["iou"]),
               "lr": window.lr, "time": round(time.time() - t0, 1)}
        folder.log.append(rec)
        if progress:
            print(rec, flush=True)

    text_step = _TextStep(cfg, model, head, data, vectors, rng, device)
    step = TrainLoop(
        next_batch=text_step.batch,
        forward=text_step.forward,
        optimizer=opt,
        scheduler=build_cosine_scheduler(opt, cfg.lr, cfg.steps, cfg.warmup_steps, start_step=step),
        params=list(head.parameters()),
        max_steps=cfg.steps,
        log_every=cfg.log_every,
        on_log=log,
        grad_clip=1.0,
        actions=[Every(cfg.ckpt_every, checkpoint)],
    ).run(step)

    # -- finish --
    checkpoint(step)
    final = folder.path / "text_head.safetensors"
    save_text_head(head.eval(), model, final)
    return final
