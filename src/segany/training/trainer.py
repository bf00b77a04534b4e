"""The SAM training loop (paper, section 3 and appendix A), single process or DDP.

One optimizer step on a batch of images (:class:`~segany.training.step.SamTrainStep`):

1. every image is encoded once (or its embedding is read from the cache, see
   :mod:`segany.training.embeddings_cache`);
2. all valid masks of all images form one decoder batch (each mask gathers its image's embedding);
3. prompts are simulated for ``num_iterations`` decoder iterations (:mod:`segany.training.prompts`):
   a point or noisy box, then points from the error region with the previous low-res logits fed back
   as the mask prompt, plus mask-only iterations; the first iteration is multimask (for a box prompt its
   3 slots all hold the single-output mask) and trains only its best output;
4. loss = ``20 focal + 1 dice + 1 IoU-MSE`` (:mod:`segany.training.losses`) averaged over masks and
   iterations; AdamW with warm-up + step decay (:mod:`segany.training.optim`).

Runs write to ``out_dir`` (:mod:`segany.training.run_files`): ``last.pt`` (resumable, tensors-only,
atomic), ``metrics.jsonl``, ``training.png``, ``best.safetensors`` (best validation metric),
``final.safetensors``, ``summary.json`` and ``config.yaml``. DDP: ``torchrun --nproc_per_node=N -m
segany.training.train --config FILE.yaml`` (gloo on CPU, nccl on GPU); rank 0 logs, validates and writes.

A run has four phases: setup (process group, model, data, optimizer), resume (from ``last.pt``), the
loop (:class:`~segany.training.loop.TrainLoop`, shared with text-head training) and finish (final
validation, checkpoint, exported weights, summary).

Host synchronisation: a step makes none on its own (prompt randomness that decides shapes is drawn
on the host, everything else on the device); the metrics are read back every ``log_every`` steps.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_json, atomic_write_text
from segany.modeling.dense_prompt_encoder import MASK_MAP
from segany.training.config import TrainConfig
from segany.training.distributed import (
    resolve_autocast,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    step_seed,
    weights_sha256,
)
from segany.training.loader import build_datasets, dataset_samples, to_device, train_loader, training_dataset
from segany.training.loop import Every, LogWindow, TrainLoop
from segany.training.optim import build_optimizer, build_scheduler
from segany.training.run_files import CHECKPOINT_VERSION, RUN_FILES, RunFolder, jsonable, plot_metrics
from segany.training.step import SamTrainStep, StepOptions, first_prompt_teacher
from segany.training.validation import metric_value, validate


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    model: nn.Module
    step: int
    out_dir: Path
    history: list[dict[str, Any]]
    best_metric: float | None
    summary: dict[str, Any]


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model to train: from a checkpoint, a named config or a config dict; drop path applied."""
    from segany.checkpoint import load_model
    from segany.modeling import SamConfig, build_sam, get_config

    if cfg.checkpoint:
        model = load_model(cfg.checkpoint, text_head=None)  # a text head beside it is not trained here
        if cfg.model_changes:
            model = changed_model(model, cfg.model_changes)
    else:
        sam_cfg = get_config(cfg.model) if isinstance(cfg.model, str) else SamConfig.from_dict(cfg.model)
        model = build_sam(sam_cfg)
        if cfg.encoder_init == "imagenet":
            from segany.modeling.efficientnet import EfficientNetLiteEncoder, load_imagenet_weights

            if not isinstance(model.image_encoder, EfficientNetLiteEncoder):
                raise SegAnyError(
                    "encoder_init: imagenet needs an EfficientNet encoder (e.g. model: segany_default_v2)"
                )
            load_imagenet_weights(model.image_encoder)
    if cfg.drop_path_rate is not None and model.config is not None:
        if model.config.encoder.drop_path_rate != cfg.drop_path_rate:
            encoder = {**model.config.to_dict()["encoder"], "drop_path_rate": cfg.drop_path_rate}
            model = changed_model(model, {"encoder": encoder})
    return model


def changed_model(model: nn.Module, changes: dict[str, Any]) -> nn.Module:
    """``model`` rebuilt with its config's fields ``changes`` replaced, its weights copied in; the parameters
    only the new model has start at zero (a zero projection adds nothing: the outputs stay the same), but
    for modules that say their own initialisation already starts as the identity (``keeps_own_init``), new
    modules that name the parts to zero for that (``zero_on_insert``: a deeper trunk's added blocks) and a
    new correction decoder, which starts as a copy of the mask decoder (the same answers)."""
    from segany.modeling import SamConfig, build_sam

    if not isinstance(model.config, SamConfig):
        raise SegAnyError("model_changes needs a model built from a SamConfig (segany's own layouts)")
    try:
        new_cfg = SamConfig.from_dict({**model.config.to_dict(), **changes})
        rebuilt = build_sam(new_cfg)
    except ValueError as e:
        raise SegAnyError(f"training option model_changes={changes!r}: {e}") from None
    try:
        result = rebuilt.load_state_dict(model.state_dict(), strict=False)
    except RuntimeError as e:  # a changed shape
        raise SegAnyError(f"training option model_changes={changes!r}: the weights do not fit ({e})") from None
    if result.unexpected_keys:
        raise SegAnyError(f"training option model_changes={changes!r} drops weights: {result.unexpected_keys}")
    params = dict(rebuilt.named_parameters())
    own = [f"{name}." for name, m in rebuilt.named_modules() if getattr(m, "keeps_own_init", False)]
    # a module wholly new to the model that zeroes only some of its parts: the rest keep their initialisation
    missing = set(result.missing_keys)
    inserted = [
        (name, m)
        for name, m in rebuilt.named_modules()
        if getattr(m, "zero_on_insert", None) and all(f"{name}.{k}" in missing for k in m.state_dict())
    ]
    own += [f"{name}." for name, _ in inserted]
    zeroed = tuple(f"{name}.{part}." for name, m in inserted for part in m.zero_on_insert)
    old = model.state_dict()
    with torch.no_grad():
        for key in result.missing_keys:
            # a new correction decoder's tensor: the mask decoder's of the same name
            twin = (
                old.get(key.replace("correction_decoder.", "mask_decoder.", 1))
                if key.startswith("correction_")
                else None
            )
            if twin is not None and key in params and twin.shape == params[key].shape:
                params[key].copy_(twin)
            elif key in params and (key.startswith(zeroed) or not key.startswith(tuple(own))):
                params[key].zero_()
    return rebuilt


def prepare_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model as training runs it: built (:func:`build_model`), frozen as configured, on ``device``,
    the encoder channels-last if asked."""
    model = build_model(cfg)
    apply_freezing(model, cfg)
    model.to(device)
    if cfg.channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    return model


def apply_freezing(model: nn.Module, cfg: TrainConfig) -> None:
    for part, frozen in (
        (model.image_encoder, cfg.freeze_image_encoder),
        (model.prompt_encoder, cfg.freeze_prompt_encoder),
        (model.mask_decoder, cfg.freeze_mask_decoder),
    ):
        for p in part.parameters():
            p.requires_grad_(not frozen)
    if cfg.frozen_stages and not cfg.freeze_image_encoder:
        freeze_stages = getattr(model.image_encoder, "freeze_stages", None)
        if freeze_stages is None:
            kind = type(model.image_encoder).__name__
            raise SegAnyError(f"frozen_stages needs a CNN encoder with stages (EfficientNet), not {kind}")
        try:
            freeze_stages(cfg.frozen_stages)
        except ValueError as e:
            raise SegAnyError(f"training option frozen_stages={cfg.frozen_stages}: {e}") from None
    if cfg.train_only:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        unused = [k for k in cfg.train_only if not any(name.startswith(k) for name, _ in trainable)]
        if unused:
            raise SegAnyError(f"training option train_only: no trainable parameter's name starts with {unused}")
        for name, p in trainable:
            p.requires_grad_(any(name.startswith(k) for k in cfg.train_only))
    if cfg.skip_without_mask:
        hold_skip_mask_at_zero(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise SegAnyError("every part of the model is frozen: nothing to train")


def hold_skip_mask_at_zero(model: nn.Module) -> None:
    """Zero the mask-grid skips' weights on the mask's logits (``MASK_MAP`` of the four prompt maps) and their
    gradients, so AdamW (zero gradient, zero weight: no step, no decay) keeps them at zero."""
    skips = [m.conv_m0 for m in model.modules() if getattr(m, "mask_skip", False)]
    if not skips or any(conv.in_channels < 2 for conv in skips):
        raise SegAnyError("training option skip_without_mask needs a model with mask_skip_prompts")
    for conv in skips:
        keep = torch.ones_like(conv.weight)
        keep[:, MASK_MAP] = 0
        with torch.no_grad():
            conv.weight.mul_(keep)
        conv.weight.register_hook(lambda grad, keep=keep: grad * keep)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for what is written."""
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        run = _SamTraining(cfg)
        run.resume()
        step = run.loop()
        return run.finish(step)
    finally:
        torch.set_num_threads(threads)


class _SamTraining:
    """One run of :func:`train`: setup (the constructor), :meth:`resume`, :meth:`loop`, :meth:`finish`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info, self.device = info, device = setup_distributed(cfg.device)
        self.folder = RunFolder(cfg.out_dir, RUN_FILES)
        self.out_dir = self.folder.path
        if info.is_main:
            self.folder.prepare()  # removes a killed run's half-written files, never valid
            atomic_write_text(self.out_dir / "config.yaml", cfg.to_yaml())
        info.barrier()

        # the order of what draws random numbers is part of a run's reproducibility
        seed_everything(cfg.seed)
        self.autocast_dtype = resolve_autocast(cfg.precision, device)
        self.model = model = prepare_model(cfg, device)

        self.train_ds = training_dataset(cfg, model, self.out_dir, device, info, self.autocast_dtype)
        self.val_ds = (
            build_datasets(cfg.val_data, cfg, int(model.image_size), None, cfg.seed + 1, mix=False)
            if cfg.val_data
            else None
        )
        self.val_samples = (
            dataset_samples(self.val_ds, cfg.val_max_images) if (self.val_ds is not None and info.is_main) else []
        )

        teacher = first_prompt_teacher(model) if cfg.first_prompt_distill > 0 else None  # the start's decoder
        self.step_module = SamTrainStep(
            model, StepOptions.from_config(cfg, self.autocast_dtype), cfg.freeze_image_encoder, teacher
        )
        self.step_module.train()
        self.optimizer = build_optimizer(
            model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.layer_decay, lr_scales=cfg.lr_scales
        )
        self.scheduler = build_scheduler(
            self.optimizer, cfg.max_steps, cfg.warmup_steps, cfg.lr_decay_at, cfg.lr_decay_factor
        )
        # the weights' moving average, started at the start's weights (the first update copies them)
        self.ema: AveragedModel | None = None
        if cfg.ema_decay > 0:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
            self.ema.update_parameters(model)
        self.start_step = 0
        self.best: float | None = None  # best validation value so far (higher is better)
        self.best_step: int | None = None
        self.last_train: dict[str, Any] | None = None

    # -- phases ------------------------------------------------------------------------------------

    def resume(self) -> None:
        """With ``cfg.resume``, continue from ``last.pt`` when there is one; else start a fresh log."""
        cfg, info, log = self.cfg, self.info, self.folder.log
        state = self.folder.load_last() if cfg.resume else None
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                if "ema" not in state:
                    raise SegAnyError(f"{self.folder.last} has no weight average: resume it with ema_decay: 0")
                self.ema.load_state_dict(state["ema"])
            self.start_step = int(state["step"])
            self.best = state.get("best_metric")
            self.best_step = state.get("best_step")
            set_rng_state(state["rng"])
            if info.is_main:
                log.truncate_after(self.start_step)
                print(
                    f"segany train: resuming from {self.folder.last} at step {self.start_step} of {cfg.max_steps}",
                    file=sys.stderr,
                )
        elif info.is_main and log.path.exists():
            log.path.unlink()  # a fresh run starts a fresh log
        info.barrier()

    def loop(self) -> int:
        """Train from the start (or resumed) step to ``max_steps``; returns the step reached."""
        cfg, info, device = self.cfg, self.info, self.device
        forward_module: nn.Module = self.step_module
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            forward_module = DDP(
                self.step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused_parameters,
            )
        loader = train_loader(self.train_ds, cfg, info, device, self.start_step)
        bar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        if self.start_step == 0 and cfg.val_at_start and self.val_ds is not None:
            self.run_validation(0)
        batches = iter(loader)

        def forward(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
            torch.manual_seed(step_seed(cfg.seed, info.rank, step))
            return forward_module(batch)

        return TrainLoop(
            next_batch=lambda step: to_device(next(batches), device),
            forward=forward,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=[p for p in self.model.parameters() if p.requires_grad],
            max_steps=cfg.max_steps,
            log_every=cfg.log_every,
            on_log=self._log,
            grad_clip=cfg.grad_clip,
            actions=(
                Every(cfg.val_every if self.val_ds is not None else 0, self.run_validation, restarts_clock=True),
                Every(cfg.ckpt_every, self.checkpoint),
            ),
            bar=bar,
            after_step=None if self.ema is None else lambda: self.ema.update_parameters(self.model),
        ).run(self.start_step)

    def finish(self, step: int) -> TrainResult:
        """The end: validate, checkpoint, export ``final`` (and ``best``), write the summary."""
        cfg, info, model = self.cfg, self.info, self.model
        raw = None
        if self.ema is not None:  # what is validated and exported is the average; last.pt resumes the steps
            raw = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.ema.module.state_dict())
        final_val = self.run_validation(step) if self.val_ds is not None else None
        self.checkpoint(step, raw)
        hashes = [str(h) for h in info.all_gather(weights_sha256(model))]
        summary: dict[str, Any] = {}
        if info.is_main:
            from segany.checkpoint import save_model

            save_model(model, self.out_dir / "final.safetensors", half=cfg.export_half)
            if self.best is None and self.val_ds is None:
                # no validation: the final weights are the best we know
                save_model(model, self.out_dir / "best.safetensors", half=cfg.export_half)
            best = self.best
            summary = {
                "steps": step,
                "world_size": info.world_size,
                "device": str(self.device),
                "precision": "bf16" if self.autocast_dtype is not None else "fp32",
                "best_metric": cfg.best_metric,
                "best_value": best if cfg.best_metric != "val_loss" or best is None else -best,
                "best_step": self.best_step,
                "last_train": self.last_train,
                "final_val": final_val,
                "weights_sha256_by_rank": hashes,
            }
            atomic_write_json(self.out_dir / "summary.json", jsonable(summary), indent=2)
            plot_metrics(self.folder.log.read(), self.out_dir / "training.png")
        info.barrier()
        history = self.folder.log.read() if info.is_main else []
        return TrainResult(model, step, self.out_dir, history, self.best, summary)

    # -- what the loop calls -----------------------------------------------------------------------

    def _log(self, window: LogWindow) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": "train", "step": window.step, **window.means}
        if not math.isfinite(rec["loss"]):
            raise SegAnyError(f"training diverged: the loss is {rec['loss']} at step {window.step}")
        rec["lr"] = window.lr
        rec["steps_per_s"] = window.steps / max(window.seconds, 1e-9)
        rec["images_per_s"] = rec["steps_per_s"] * self.cfg.batch_size * self.info.world_size
        rec["data_wait_frac"] = window.data_wait / max(window.seconds, 1e-9)  # ~1: the loader is the bottleneck
        if self.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.last_train = rec
        if self.info.is_main:
            self.folder.log.append(rec)
        return {"loss": f"{rec['loss']:.4f}", "iou": f"{rec['iou_last']:.3f}"}

    def checkpoint(self, step: int, model_state: dict[str, torch.Tensor] | None = None) -> None:
        """``last.pt`` (rank 0): everything a resume needs, tensors and numbers only (``model_state``: the
        weights to resume from, when the model holds others)."""
        if not self.info.is_main:
            return
        self.folder.save_last(
            {
                "version": CHECKPOINT_VERSION,
                "model": model_state
                if model_state is not None
                else {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": step,
                "best_metric": self.best,
                "best_step": self.best_step,
                "rng": rng_state(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "config": json.dumps(self.cfg.to_dict(), default=str),
                # the architecture, as final.safetensors carries it: load_model reads it (some of it,
                # such as the decoder's head count, cannot be read off the weights)
                "model_config": json.dumps(self.model.config.to_dict()),
            }
        )

    def run_validation(self, step: int) -> dict[str, Any] | None:
        """Validate (rank 0), log, keep ``best.safetensors`` and redraw the plot; the record or None."""
        rec = None
        if self.info.is_main and self.val_ds is not None:
            val = validate(self.step_module, self.val_ds, self.val_samples, self.cfg, self.device)
            rec = {"kind": "val", "step": step, **val}
            self.folder.log.append(jsonable(rec))
            value = metric_value(self.cfg, val)
            if value is not None and (self.best is None or value > self.best):
                self.best, self.best_step = value, step
                from segany.checkpoint import save_model

                save_model(self.model, self.out_dir / "best.safetensors", half=self.cfg.export_half)
            plot_metrics(self.folder.log.read(), self.out_dir / "training.png")
        self.info.barrier()
        return rec


if __name__ == "__main__":  # the entry point's old name: torchrun ... -m segany.training.trainer still works
    import runpy

    runpy.run_module("segany.training.train", run_name="__main__", alter_sys=True)
