"""The chunked LM loss equals the plain cross-entropy: value and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2.model import loss as lm


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk_rows, monkeypatch) -> None:
    monkeypatch.setattr(lm, "CHUNK_BYTES", chunk_rows * 4 * 97)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float32, requires_grad=True)
    w = (0.3 * torch.randn(97, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 97, (50,), generator=g)
    t[[3, 17, 40]] = -1  # ignored positions

    loss = lm.lm_loss(h, w, t)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    (2.5 * ref).backward()

    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_without_grad() -> None:
    h, w, t = torch.randn(8, 4), torch.randn(11, 4), torch.randint(0, 11, (8,))
    with torch.no_grad():
        out = lm.lm_loss(h, w, t)
    torch.testing.assert_close(out, F.cross_entropy(h @ w.t(), t))
