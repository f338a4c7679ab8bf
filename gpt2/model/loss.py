"""Language-model loss: LM head + cross-entropy, chunked on CPU so the logits never exist whole.

On CPU a GPT-2 step is dominated by the (tokens x 50k) logits: allocating, faulting in and
freeing them, their softmax and their gradient. The chunked form computes loss and both
gradients a few rows at a time in the forward pass (the loss is the graph's output, so the
incoming gradient is just a scalar that backward applies). It is exact: same loss and gradients
as ``F.cross_entropy(h @ W.T, targets, ignore_index=-1)`` up to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk so one chunk of fp32 logits stays under glibc's 32 MiB mmap ceiling: such blocks
# come from the reused heap instead of fresh, page-faulting mappings (measured: 114 ms vs 200 ms
# for head + loss + gradients of 512 rows on 2 cores; 64-128-row chunks were fastest).
CHUNK_BYTES = 24 * 2**20


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = h.shape[0]
        valid_all = targets != -1
        count = valid_all.sum().clamp(min=1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            hc = h[start : start + rows]
            tc = targets[start : start + rows]
            valid = valid_all[start : start + rows]
            safe = tc.clamp(min=0).unsqueeze(1)
            logits = hc @ weight.t()  # (rows, V) fp32
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, safe).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_grad:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                probs.scatter_add_(1, safe, -valid.to(probs.dtype).unsqueeze(1))
                probs.mul_((valid.to(probs.dtype) / count).unsqueeze(1))
                torch.mm(probs, weight, out=grad_h[start : start + rows])
                grad_w.addmm_(probs.t(), hc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 = ignore).

    ``h`` (N, C), ``weight`` (V, C), ``targets`` (N,). Chunked on fp32 CPU tensors outside
    autocast; the plain fused kernel elsewhere (on CUDA the compiler and the caching allocator
    handle the logits well).
    """
    fp32 = h.dtype == torch.float32 and weight.dtype == torch.float32
    if h.device.type == "cpu" and fp32 and not torch.is_autocast_enabled("cpu"):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, rows)
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)
