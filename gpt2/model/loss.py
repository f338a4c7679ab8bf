"""Language-model loss: LM head + cross-entropy, chunked on CPU so the logits never exist whole.

On CPU a GPT-2 step is dominated by the (tokens x 50k) logits: allocating, faulting in and
freeing them, their softmax and their gradient. The chunked form computes loss and both
gradients a few rows at a time in the forward pass (the loss is the graph's output, so the
incoming gradient is just a scalar that backward applies). Each chunk's logits get one softmax
pass; the loss is read off it and the gradient is the softmax itself, less one at the target.
It is exact: same loss and gradients as ``F.cross_entropy(h @ W.T, targets, ignore_index=-1)``
up to float rounding (tested).

Under CPU bf16 autocast the three head matmuls run in bf16 (AMX makes them 3-5x faster than
fp32; AVX512-BF16 alone does not) while the softmax stays in fp32, which is the precision autocast
itself gives ``linear`` followed by ``cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk so one chunk of fp32 logits stays under glibc's 32 MiB mmap ceiling: such blocks
# come from the reused heap instead of fresh, page-faulting mappings (measured: 114 ms vs 200 ms
# for head + loss + gradients of 512 rows on 2 cores; 64-128-row chunks were fastest).
CHUNK_BYTES = 24 * 2**20
# bf16 path: the logit gradients of this many rows are kept and multiplied into the weight
# gradient at once (one large bf16 matmul beats many thin ones; ~100 MB at 1024 x 50k).
GROUP_ROWS = 1024
# That buffer is larger than the mmap ceiling, so a fresh one per step would be page-faulted in
# every time (measured: 38 ms of a 185 ms tiny step). It is allocated once and kept.
_group_buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _group_buffer(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    key = (GROUP_ROWS, vocab, dtype)
    if key not in _group_buffers:
        _group_buffers.clear()  # one model per process: keep at most one buffer
        _group_buffers[key] = torch.empty((GROUP_ROWS, vocab), dtype=dtype)
    return _group_buffers[key]


def _target_nll(logits: torch.Tensor, probs: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Per-row -log softmax(logits)[target], from the softmax already computed, exactly: the row's
    largest probability sits at its largest logit m and is at least 1/vocab, so logsumexp =
    m - log(max p) never underflows (unlike -log p[target]), and costs two cheap max passes."""
    lse = logits.amax(dim=1).float() - probs.amax(dim=1).log()
    return lse - logits.gather(1, safe).squeeze(1).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        compute_dtype: torch.dtype,
        need_grad: bool,
    ) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            n, vocab = h.shape[0], weight.shape[0]
            valid_all = (targets != -1).to(torch.float32)
            count = valid_all.sum().clamp(min=1)
            safe_all = targets.clamp(min=0).unsqueeze(1)
            low = compute_dtype != torch.float32
            hx, wx = h.to(compute_dtype), weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32)
            grad_h = torch.empty_like(hx) if need_grad else None
            grad_w: torch.Tensor | None = None  # fp32; the first product initialises it (no zero fill)
            group = _group_buffer(vocab, compute_dtype) if need_grad and low else None
            scale_all = valid_all / count  # d loss / d logits = (softmax - onehot) * scale, per row
            minus_one = torch.full((n, 1), -1.0)
            for g0 in range(0, n, GROUP_ROWS):
                g1 = min(n, g0 + GROUP_ROWS)
                for start in range(g0, g1, rows):
                    end = min(g1, start + rows)
                    hc, safe, valid = hx[start:end], safe_all[start:end], valid_all[start:end]
                    logits = torch.mm(hc, wx.t())
                    # One softmax pass (each 50k row stays in cache) instead of log_softmax, exp and
                    # a scaling pass over the whole chunk: the loss is read off it (_target_nll),
                    # and the row scale moves onto the small (rows x C) operands of the two matmuls.
                    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
                    total += (_target_nll(logits, probs, safe) * valid).sum()
                    if not need_grad:
                        continue
                    probs.scatter_add_(1, safe, minus_one[start:end])
                    if low:  # bf16 products; their scaling happens in fp32, below
                        gc = group[start - g0 : end - g0]
                        gc.copy_(probs)
                        torch.mm(gc, wx, out=grad_h[start:end])
                    else:
                        scale = scale_all[start:end].unsqueeze(1)
                        torch.mm(probs, wx, out=grad_h[start:end]).mul_(scale)
                        hs = hc * scale
                        grad_w = probs.t() @ hs if grad_w is None else grad_w.addmm_(probs.t(), hs)
                if need_grad and low:  # the 0/1 mask is exact in bf16; 1/count is applied in fp32
                    hs = hx[g0:g1] * valid_all[g0:g1].unsqueeze(1).to(hx.dtype)
                    part = torch.mm(group[: g1 - g0].t(), hs).float().div_(count)
                    grad_w = part if grad_w is None else grad_w.add_(part)
            if need_grad and low:
                grad_h = grad_h.float().mul_(scale_all.unsqueeze(1))
            # Kept on ctx rather than saved: backward scales them in place (no 25 MB copy per
            # step) and drops them, so a second backward fails loudly instead of scaling twice.
            ctx.grads = (grad_h.to(h.dtype), grad_w.to(weight.dtype)) if need_grad else None
            return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("lm_loss: backward through the chunked loss can run only once")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None


def lm_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 = ignore).

    ``h`` (N, C), ``weight`` (V, C), ``targets`` (N,). Chunked on CPU (in fp32, or with bf16
    matmuls under bf16 autocast); the plain fused kernel elsewhere (on CUDA the compiler and the
    caching allocator handle the logits well). ``sparse``: most targets are -1; on CPU the
    head then runs on the other rows only.
    """
    if h.device.type == "cpu" and weight.dtype == torch.float32:
        compute = torch.float32
        if torch.is_autocast_enabled("cpu"):
            compute = torch.get_autocast_dtype("cpu")
        # Under torch.compile the bf16 form's cached buffer and saved gradients cannot be traced;
        # the compiler gets the plain form there (the fp32 form traces as one graph).
        traceable = compute is torch.float32 or not torch.compiler.is_compiling()
        if compute in (torch.float32, torch.bfloat16) and traceable:
            if sparse and not torch.compiler.is_compiling():
                # The head runs on the scored rows only (MQAR: 4 of 64); the others' gradient is
                # zero either way, so this is exact.
                asked = targets != -1
                if 0 < int(asked.sum()) < len(targets):
                    h, targets = h[asked], targets[asked]
            rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
            # Gradients are computed in the forward pass, so only when backward can follow: not
            # under no_grad (evaluation), where forward alone is a fraction of the cost.
            need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
            return _ChunkedLinearCrossEntropy.apply(h, weight, targets, rows, compute, need_grad)
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)
