"""Language-model loss: LM head + cross-entropy, chunked on CPU so the logits never exist whole.

On CPU a GPT-2 step is dominated by the (tokens x 50k) logits: allocating, faulting in and
freeing them, their softmax and their gradient. The chunked form computes loss and both
gradients a few rows at a time in the forward pass (the loss is the graph's output, so the
incoming gradient is just a scalar that backward applies). Each chunk's logits are overwritten
by their gradient, softmax less one at the target, in one fused sweep per row that also gives
the loss (:func:`gpt2.kernels.xent_rows`). It is exact: same loss and gradients as
``F.cross_entropy(h @ W.T, targets, ignore_index=-1)`` up to float rounding (tested).

Under CPU bf16 autocast the three head matmuls run in bf16 (AMX makes them 3-5x faster than
fp32, AVX512-BF16 on an AMD EPYC 2.5x) while the softmax stays in fp32, which is the precision autocast
itself gives ``linear`` followed by ``cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2.kernels import fused_xent_available, xent_rows

# Bytes of logits per chunk at most (667 fp32 or 1334 bf16 rows of 50k; chunks of equal size).
# The chunk is computed into a buffer kept from step to step and overwritten by its gradient in
# place, so its size is no longer held under glibc's 32 MiB mmap ceiling; larger chunks make the
# three head matmuls less thin (measured, 512 rows of 50,304 x 128 on 2 EPYC cores: fp32 head +
# loss + gradients 131 ms in 125-row chunks, 113 in 256-row ones, 110 in one chunk).
CHUNK_BYTES = 128 * 2**20
# Without the kernel, ATen's softmax makes a fresh fp32 copy of each chunk: that one must stay
# under the mmap ceiling, or every chunk is page-faulted in (114 ms against 200 ms, 512 rows).
ATEN_CHUNK_BYTES = 24 * 2**20
# The chunk buffer, the bf16 copy of the head's weight and its bf16 gradient product are kept
# from step to step: fresh ones are page-faulted in every time (measured: 38 ms of a 185 ms tiny
# step for a 1024-row bf16 buffer; casting the weight into a kept buffer takes 0.47 ms against
# 1.1 ms into a fresh one; GPT-2 124M's bf16 head, 1024 rows: 456 ms in chunks of 1000 and 24
# rows with fresh gradient products, 388 ms in two of 512 with a kept one, 351 ms in one chunk).
_kept_buffers: dict[str, torch.Tensor] = {}


def _kept(slot: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The process's buffer for ``slot``, at least ``shape`` (first dimension sliced to it); it
    grows when a larger one is asked for, and a new dtype or width replaces it."""
    buf = _kept_buffers.get(slot)
    if buf is None or buf.dtype != dtype or buf.shape[1] != shape[1] or buf.shape[0] < shape[0]:
        _kept_buffers[slot] = buf = torch.empty(shape, dtype=dtype)
    return buf[: shape[0]]


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows of logits per chunk: :data:`CHUNK_BYTES` of them with the fused kernel, else
    :data:`ATEN_CHUNK_BYTES` of fp32 (ATen's softmax copy)."""
    if not torch.compiler.is_compiling() and fused_xent_available():
        return max(1, CHUNK_BYTES // (dtype.itemsize * vocab))
    return max(1, min(CHUNK_BYTES, ATEN_CHUNK_BYTES) // (4 * vocab))


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
            safe_all = targets.clamp(min=0)
            low = compute_dtype != torch.float32
            hx = h.to(compute_dtype)
            wx = _kept("weight", tuple(weight.shape), compute_dtype).copy_(weight) if low else weight
            rows = max(1, -(-n // max(1, -(-n // rows))))  # the fewest chunks, equal (no thin last one)
            buf = wbuf = None  # (the compiler traces fresh tensors, not kept buffers)
            if not torch.compiler.is_compiling():
                buf = _kept("logits", (rows, vocab), compute_dtype)
                wbuf = _kept("weight_grad", tuple(weight.shape), compute_dtype) if need_grad and low else None
            total = torch.zeros((), dtype=torch.float32)
            grad_h = torch.empty_like(hx) if need_grad else None
            grad_w: torch.Tensor | None = None  # fp32; the first product initialises it (no zero fill)
            scale_all = valid_all / count  # d loss / d logits = (softmax - onehot) * scale, per row
            for start in range(0, n, rows):
                end = min(n, start + rows)
                hc, safe, valid = hx[start:end], safe_all[start:end], valid_all[start:end]
                # The kernel overwrites each row of logits with its gradient, softmax - onehot, in
                # one sweep that also gives the loss; the row scale moves onto the small (rows x C)
                # operands of the two matmuls.
                out = None if buf is None else buf[: end - start]
                logits = torch.mm(hc, wx.t(), out=out)
                total += (xent_rows(logits, safe, logits) * valid).sum()
                if not need_grad:
                    continue
                probs = logits  # now softmax - onehot
                if low:  # bf16 products, scaled in fp32: 1/count in bf16 would be 0.2% off
                    torch.mm(probs, wx, out=grad_h[start:end])
                    part = torch.mm(probs.t(), hc * valid.unsqueeze(1).to(hc.dtype), out=wbuf)
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)
                else:
                    scale = scale_all[start:end].unsqueeze(1)
                    torch.mm(probs, wx, out=grad_h[start:end]).mul_(scale)
                    hs = hc * scale
                    grad_w = probs.t() @ hs if grad_w is None else grad_w.addmm_(probs.t(), hs)
            if need_grad and low:
                grad_h = grad_h.float().mul_(scale_all.unsqueeze(1))
            # Kept on ctx rather than saved: backward scales them in place (no 25 MB copy per
            # step) and drops them, so a second backward fails loudly instead of scaling twice.
            ctx.grads = (grad_h.to(h.dtype), grad_w.to(weight.dtype)) if need_grad else None
            ctx.w_scale = 1 / count if low else None  # bf16: grad_w's 1/count, with grad_out's
            return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("lm_loss: backward through the chunked loss can run only once")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        w_scale = grad_out if ctx.w_scale is None else grad_out * ctx.w_scale
        return grad_h.mul_(grad_out), grad_w.mul_(w_scale), None, None, None, None


def loss_kernel(device: torch.device) -> str:
    """What computes the softmax of the loss on ``device``: ``fused`` (the compiled CPU kernel,
    built now if needed), ``aten`` (PyTorch's ops: no C compiler here, or GPT2_FUSED_LOSS=0), or
    ``cross_entropy`` (off CPU, ``F.cross_entropy``)."""
    if device.type != "cpu":
        return "cross_entropy"
    return "fused" if fused_xent_available() else "aten"


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
            rows = chunk_rows(weight.shape[0], compute)
            # Gradients are computed in the forward pass, so only when backward can follow: not
            # under no_grad (evaluation), where forward alone is a fraction of the cost.
            need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
            return _ChunkedLinearCrossEntropy.apply(h, weight, targets, rows, compute, need_grad)
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)
