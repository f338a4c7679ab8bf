"""GPT-2: token + position embeddings, pre-LN blocks, tied LM head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model.attention import ATTENTION, KVCache
from gpt2.model.config import GPTConfig
from gpt2.model.loss import lm_loss
from gpt2.model.mlp import MLP_VARIANTS


class TokenEmbedding(nn.Embedding):
    """The token lookup. Once tied to the LM head (``tied_to_head``), its gradient on CPU is sparse
    (the rows looked up) and autograd adds it to the head's dense gradient of the same weight
    (out of place: torch adds in place only when the sparse one comes first), instead of
    zero-filling a second (vocab x C) gradient and adding the two (measured with the fused loss:
    50.5 against 49.7 ms a bf16 tiny step on 2 EPYC cores). The weight's gradient is dense either
    way, and the module's hooks and state dict are ``nn.Embedding``'s."""

    tied_to_head = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse or (
            self.tied_to_head
            and idx.device.type == "cpu"
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # the compiler takes dense gradients only
        )
        return F.embedding(
            idx, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse
        )


class Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTENTION[config.attention](config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP_VARIANTS[config.mlp](config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT-2 language model; variants come from ``config.attention`` / ``config.mlp``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        if config.attention not in ATTENTION:
            raise ValueError(f"unknown attention variant {config.attention!r}; known: {sorted(ATTENTION)}")
        if config.mlp not in MLP_VARIANTS:
            raise ValueError(f"unknown MLP variant {config.mlp!r}; known: {sorted(MLP_VARIANTS)}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=TokenEmbedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.transformer.wte.tied_to_head = True
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), zero biases; residual projections N(0, 0.02/sqrt(2L))."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights count once; by default without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states after ``ln_f``; with ``cache``, the
        tokens come after the cached positions, and the cache then holds them too."""
        _, T = idx.shape
        start = 0 if cache is None else cache.length
        if self.config.block_size < start + T:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    @property
    def supports_kv_cache(self) -> bool:
        return all(type(b.attn).supports_kv_cache for b in self.transformer.h)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, logits_at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Without targets: (B, T) -> logits (B, T, vocab); with ``logits_at`` (B, T) bool, only the
        logits of those positions, (N, vocab) in row-major order (the head is most of the cost).

        With targets (B, T): the mean cross-entropy over positions whose target is not -1,
        a scalar; the full logits are not returned so the loss can be computed cheaply.
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h if logits_at is None else h[logits_at])
        flat = h.reshape(-1, h.size(-1))
        return lm_loss(flat, self.lm_head.weight, targets.reshape(-1), self.config.sparse_targets)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to (B, T) ``idx``; returns (B, T + new).

        With ``use_cache`` (where the attention supports it: not KV pruning) the prompt is
        prefilled once and each new token costs one position. Once the sequence outgrows the block,
        the context window slides and every position moves, so each token is computed afresh over
        the last ``block_size`` tokens, as without a cache (greedy decoding gives the same tokens
        either way; tested).
        """
        bs = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and self.supports_kv_cache and idx.size(1) <= bs:
                if cache is None:
                    cache = KVCache(self.config.n_layer, bs)
                    h = self.hidden_states(idx, cache)
                else:
                    h = self.hidden_states(idx[:, -1:], cache)
            else:
                h = self.hidden_states(idx[:, -bs:])
            logits = self.lm_head(h[:, -1, :]).float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
