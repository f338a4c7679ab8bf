"""AdamWSPAM against hand-computed steps: the AdamW core, spike clipping, moment reset, re-warmup."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from gpt2.optim.spam import AdamWSPAM, paper_clips, paper_rewarmup_multiplier, rewarmup_multiplier
from tests.conftest import DEVICES, HostReads

B1, B2, EPS = 0.9, 0.999, 1e-8


def adamw_by_hand(p0: list[float], grads: list[list[float]], lr: float, wd: float) -> list[float]:
    """Loshchilov & Hutter's AdamW on floats: decay, then the bias-corrected Adam step."""
    out = []
    for i, p in enumerate(p0):
        m = v = 0.0
        for t, g in enumerate((step[i] for step in grads), start=1):
            p *= 1 - lr * wd
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            p -= lr * (m / (1 - B1**t)) / (math.sqrt(v / (1 - B2**t)) + EPS)
        out.append(p)
    return out


def run(opt_cls, grads, **kw) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p, opt


GRADS = [[0.1, -0.2], [0.3, 0.05], [-0.1, 0.4]]


def test_adamw_core_matches_the_hand_computed_three_steps():
    p, _ = run(AdamWSPAM, GRADS, lr=0.1, weight_decay=0.1, interval=0)
    assert p.tolist() == pytest.approx(adamw_by_hand([1.0, -2.0], GRADS, lr=0.1, wd=0.1), rel=1e-6)


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_with_spam_off_it_is_torch_adamw_bit_for_bit(impl, amsgrad):
    kw = dict(lr=0.1, weight_decay=0.1, amsgrad=amsgrad, **impl)
    ours, _ = run(AdamWSPAM, GRADS, interval=0, **kw)
    theirs, _ = run(torch.optim.AdamW, GRADS, **kw)
    assert torch.equal(ours, theirs)


def test_spike_is_clipped_to_sqrt_theta_v_once_v_exists():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdamWSPAM([p], lr=1e-3, weight_decay=0.0, theta=50.0, interval=0, enable_clip=True)
    p.grad = torch.tensor([1.0, -1.0, 1.0e6])  # step 1: no v yet, nothing is clipped
    opt.step()
    assert p.grad.tolist() == [1.0, -1.0, 1.0e6]
    v = opt.state[p]["exp_avg_sq"].clone()  # (1 - 0.999) * g^2 = [0.001, 0.001, 1e9]
    p.grad = torch.tensor([1000.0, -1000.0, 0.1])  # planted spikes in the first two entries
    opt.step()
    thr = math.sqrt(50.0 * (0.001 + 1e-12))  # 0.2236...
    assert p.grad.tolist() == pytest.approx([thr, -thr, 0.1], rel=1e-6)
    clipped = torch.tensor([thr, -thr, 0.1])
    assert torch.allclose(opt.state[p]["exp_avg_sq"], B2 * v + (1 - B2) * clipped**2, rtol=1e-6)


def test_rewarmup_multiplier_values():
    # interval 4, warmup 2: resets at steps 4 and 8 set warmup_until to 6 and 10
    until = {4: 6, 5: 6, 6: 6, 7: 6, 8: 10, 9: 10, 10: 10}
    got = [rewarmup_multiplier(t, until.get(t, 0), 2) for t in range(1, 11)]
    assert got == pytest.approx([1.0, 1.0, 1.0, 1e-3, 0.5, 1.0, 1.0, 1e-3, 0.5, 1.0], abs=1e-12)
    # p = 1/4 of a 4-step warm-up: ½(1 − cos(π/4))
    assert rewarmup_multiplier(5, 8, 4) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))


def spam_by_hand(grads: list[float], lr: float, interval: int, warmup: int) -> list[tuple[float, ...]]:
    """(p, m, v) after each step of SPAM on one float: reset at t % interval == 0, then re-warmup."""
    p, m, v, until, out = 0.0, 0.0, 0.0, 0, []
    for t, g in enumerate(grads, start=1):
        if t % interval == 0:
            m = v = 0.0
            until = t + warmup
        scale = 1.0
        if t < until:
            scale = max(1e-3, 0.5 * (1 - math.cos(math.pi * (warmup - (until - t)) / warmup)))
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p -= lr * scale * (m / (1 - B1**t)) / (math.sqrt(v / (1 - B2**t)) + EPS)
        out.append((p, m, v))
    return out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_moments_reset_at_every_interval_and_the_lr_rewarms(amsgrad):
    grads = [1.0, 0.5, -0.25, 2.0, 1.0, 0.5, 1.0, -1.0, 0.75]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdamWSPAM([p], lr=0.01, weight_decay=0.0, interval=4, warmup_steps=2, amsgrad=amsgrad)
    expected = spam_by_hand(grads, lr=0.01, interval=4, warmup=2)
    for t, (g, (p_t, m_t, v_t)) in enumerate(zip(grads, expected), start=1):
        p.grad = torch.tensor([g])
        opt.step()
        st = opt.state[p]
        assert st["exp_avg"].item() == pytest.approx(m_t, rel=1e-6), t
        assert st["exp_avg_sq"].item() == pytest.approx(v_t, rel=1e-6), t
        if not amsgrad:  # AMSGrad changes the denominator, so p follows the hand oracle only without it
            assert p.item() == pytest.approx(p_t, rel=1e-5, abs=1e-9), t
        if amsgrad and t % 4 == 0:  # the running maximum restarts with the moments
            assert st["max_exp_avg_sq"].item() == pytest.approx(v_t, rel=1e-6)
        assert opt.param_groups[0]["lr"] == 0.01  # the multiplier never leaks into the group
    assert opt.spam["step"] == 9 and opt.spam["resets"] == 2  # one count per step, resets at 4 and 8


def test_spike_detection_soft_resets_the_moments():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamWSPAM([p], lr=1e-3, interval=0, spike_detection=True)
    for t in range(11):
        p.grad = torch.tensor([0.6, 0.8]) * (1.0 if t % 2 else 1.1)  # norms 1.1, 1.0, ...
        opt.step()
    assert opt.spam["spikes"] == 0
    m, v = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    g = torch.tensor([6.0, 8.0])  # norm 10: far beyond 2 std of the last ten
    p.grad = g.clone()
    opt.step()
    assert opt.spam["spikes"] == 1
    assert torch.allclose(opt.state[p]["exp_avg"], B1 * 0.5 * m + (1 - B1) * g)
    assert torch.allclose(opt.state[p]["exp_avg_sq"], B2 * 0.9 * v + (1 - B2) * g * g)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_resume_mid_rewarmup_continues_the_same_trajectory(variant):
    grads = [[0.1, -0.2], [0.3, 0.05], [-0.1, 0.4], [0.2, 0.2], [0.5, -0.1], [0.05, 0.3]]
    kw = dict(lr=0.1, weight_decay=0.1, interval=4, warmup_steps=3, enable_clip=True, spam_variant=variant)
    kw |= dict(clip_settle=1) if variant == "paper" else {}  # the paper's clipping at steps 5 and 6
    whole, _ = run(AdamWSPAM, grads, **kw)
    first, opt = run(AdamWSPAM, grads[:5], **kw)  # stops inside the re-warm-up after the reset at 4
    p = torch.nn.Parameter(first.detach().clone())
    resumed = AdamWSPAM([p], **kw)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.spam["step"] == 5 and resumed.spam["warmup_until"] == 7
    p.grad = torch.tensor(grads[5])
    resumed.step()
    assert torch.equal(p, whole)


def _skip_on_host(grads: list[list[float]], device: str, **kw) -> tuple[torch.nn.Parameter, AdamWSPAM]:
    """The reference: a non-finite gradient's step is never called (what the trainer did by a host read)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], device=device))
    opt = AdamWSPAM([p], fused=True, **kw)
    for g in grads:
        p.grad = torch.tensor(g, device=device)
        if all(math.isfinite(x) for x in g):
            opt.step()
    return p, opt


@pytest.mark.parametrize(
    "bad",
    [
        (),  # no skips: no read-backs needed between events
        (4,),  # the reset step itself is skipped: the reset moves to the next applied step
        (2, 3, 6),  # skips before a reset and inside the re-warmup
        (5, 7, 8, 9, 13),  # skips across the end of a re-warmup and the next reset
        (0, 1),  # the first calls: no clipping against the zero v their skipped steps leave
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_skipping_on_the_device_follows_the_host_skip_exactly(bad, device):
    """found_inf steps (no host read of the gradient) give the trajectory of never calling step()."""
    rng = torch.Generator().manual_seed(0)
    grads = [(torch.randn(2, generator=rng) * 0.3).tolist() for _ in range(18)]
    for i in bad:
        grads[i] = [float("nan"), 1.0]
    kw = dict(lr=0.1, weight_decay=0.1, interval=5, warmup_steps=3, enable_clip=True, theta=4.0)
    ref, ref_opt = _skip_on_host(grads, device, **kw)

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], device=device))
    opt = AdamWSPAM([p], fused=True, **kw)
    assert opt.skips_on_device
    reads = []
    for g in grads:
        p.grad = torch.tensor(g, device=device)
        opt.found_inf = torch.tensor(0.0 if all(math.isfinite(x) for x in g) else 1.0, device=device)
        with HostReads() as r:
            opt.step()
        reads.append(r.count)
        assert all(isinstance(group["lr"], float) and group["lr"] == 0.1 for group in opt.param_groups)
    opt.found_inf = None
    torch.testing.assert_close(p, ref, rtol=1e-7, atol=0)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(opt.state[p][k], ref_opt.state[ref][k], rtol=1e-7, atol=0)
    assert opt.state_dict()["spam"] == ref_opt.state_dict()["spam"]
    # Host reads only where SPAM acts: at a reset step, the step after it and the end of a
    # re-warmup (one each), plus a few more around skipped steps.
    assert max(reads) == 1
    if not bad:  # + the second step: clipping starts there
        assert [t for t, n in enumerate(reads, start=1) if n] == [2, 5, 6, 8, 10, 11, 13, 15, 16, 18]
    assert sum(reads) <= 1 + 3 * (len(grads) // 5) + 2 * len(bad)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_clipping_equals_the_eager_form_and_compiles_once():
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    scales = (1, 1, 20, 1, 30, 1)  # spikes at steps 3 and 5
    grads = [[torch.randn(3, 4, generator=gen) * s, torch.randn(5, generator=gen) * s] for s in scales]
    kw = dict(lr=0.1, weight_decay=0.1, interval=0, enable_clip=True, theta=2.0)

    def train(**extra):
        params = [torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(5))]
        opt = AdamWSPAM(params, fused=True, **{**kw, **extra})
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = train(), train(compile_clip=True)
    assert counters["frames"]["ok"] == 1 and not counters["recompiles"]  # one group, one graph
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    unclipped = train(enable_clip=False)  # the spikes at steps 3 and 5 were clipped
    assert not torch.allclose(eager[0], unclipped[0], rtol=1e-3)


def test_spike_clipping_and_detection_see_the_gradients_before_the_global_clip():
    """Reference order (spec §6.2): spike clip, spike detection, then the global norm clip; the
    detector's norms are therefore the raw ones, not norms capped at --grad-clip (1.0 here)."""
    from gpt2.trainer.step import TrainStep

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = AdamWSPAM(model.parameters(), lr=1e-3, interval=0, spike_detection=True)
    step = TrainStep(
        model, opt, device=torch.device("cpu"), dtype=torch.float32, accumulation=1, grad_clip=1.0
    )
    step.forward_model = _ScaledLoss(model, 1000.0)
    x = torch.randn(4, 8)
    for _ in range(3):
        out = step(lambda: (x, x), lr=1e-3)
    assert min(opt.spam["norms"]) > 10.0, opt.spam["norms"]
    assert float(out.grad_norm) > 10.0  # the trainer logs the same unclipped norm


class _ScaledLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x, y):
        return ((self.model(x) - y) ** 2).mean() * self.scale


def test_an_overflowed_step_is_skipped_even_though_spike_clipping_would_make_it_finite():
    """Spike clipping clamps +-inf to a finite threshold; the skip test must see the raw gradients."""
    from gpt2.trainer.step import TrainStep

    model = _Weighted(torch.randn(8, generator=torch.Generator().manual_seed(0)))
    opt = AdamWSPAM(model.parameters(), lr=1e-3, interval=0, enable_clip=True)
    step = TrainStep(
        model, opt, device=torch.device("cpu"), dtype=torch.float32, accumulation=1, grad_clip=1.0
    )
    x = torch.ones(1)
    for _ in range(3):
        step(lambda: (x, x), lr=1e-3)
    before = model.w.detach().clone()
    out = step(lambda: (x * float("inf"), x), lr=1e-3)  # every gradient element +inf, none NaN
    assert float(out.applied) == 0.0
    assert torch.equal(model.w, before)


class _Weighted(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x, y):
        return (self.w**2).sum() * x.sum()


# ---------------------------------------------------------- the two variants, by hand
# One weight, p0 = 1, beta1 = beta2 = 0.5, lr 0.1, weight decay 0.1, eps 0.01 (large, so where it is
# added shows), theta 4, a reset every 4 steps with a 2-step re-warmup, and a spike (10) at step 5,
# right after the reset at step 4. The paper variant settles for 2 steps (20 in the authors' code)
# so that the sequence stays short: it clips at t >= 2 with t mod 4 >= 2, i.e. at steps 2, 3, 6.
SPIKED = [1.0, 1.0, 1.0, 1.0, 10.0, 1.0]
HAND = dict(lr=0.1, weight_decay=0.1, eps=0.01, betas=(0.5, 0.5), theta=4.0, interval=4, warmup_steps=2)


def reference_by_hand(grads: list[float]) -> list[tuple[float, ...]]:
    """(p, m, v, clipped g, LR multiplier) after each step: clip against v + 1e-12 from step 2,
    re-warm the whole LR (decay included), torch AdamW's m̂/(√v̂ + eps)."""
    p, m, v, until, out = 1.0, 0.0, 0.0, 0, []
    for t, g in enumerate(grads, start=1):
        if t >= 2:  # v of the previous step
            thr = math.sqrt(4.0 * (v + 1e-12))
            g = max(-thr, min(thr, g))
        if t % 4 == 0:
            m = v = 0.0
            until = t + 2
        scale = max(1e-3, 0.5 * (1 - math.cos(math.pi * (t - (until - 2)) / 2))) if t < until else 1.0
        lr = 0.1 * scale
        p *= 1 - lr * 0.1
        m, v = 0.5 * m + 0.5 * g, 0.5 * v + 0.5 * g * g
        p -= lr * (m / (1 - 0.5**t)) / (math.sqrt(v / (1 - 0.5**t)) + 0.01)
        out.append((p, m, v, g, scale))
    return out


def paper_by_hand(grads: list[float]) -> list[tuple[float, ...]]:
    """The same for the authors' code: reset, then clip against v only where it settled,
    re-warm 0.01 + 0.99·½(1 − cos(π·c/3)), eps on the raw √v, decay after at the plain LR."""
    p, m, v, until, out = 1.0, 0.0, 0.0, 0, []
    for t, g in enumerate(grads, start=1):
        if t % 4 == 0:
            m = v = 0.0
            until = t + 2
        if t >= 2 and t % 4 >= 2 and g * g > 4.0 * v:
            g = math.copysign(math.sqrt(4.0 * v), g)
        c = t - (until - 2)
        scale = 0.01 + 0.99 * 0.5 * (1 - math.cos(math.pi * c / 3)) if t < until else 1.0
        m, v = 0.5 * m + 0.5 * g, 0.5 * v + 0.5 * g * g
        p -= 0.1 * scale * math.sqrt(1 - 0.5**t) / (1 - 0.5**t) * m / (math.sqrt(v) + 0.01)
        p -= 0.1 * 0.1 * p
        out.append((p, m, v, g, scale))
    return out


@pytest.mark.parametrize(
    ("variant", "by_hand", "spike_seen", "multipliers"),
    [
        # the spike is clipped against one step of v after the reset: sqrt(4·0.5) = √2
        ("reference", reference_by_hand, math.sqrt(2.0), [1.0, 1.0, 1.0, 1e-3, 0.5, 1.0]),
        # the spike comes in the settling steps after the reset: it passes whole; re-warmup
        # 0.01 at the reset, then 0.01 + 0.99·¼ = 0.2575 (cos(π/3) = ½), then 1
        ("paper", paper_by_hand, 10.0, [1.0, 1.0, 1.0, 0.01, 0.2575, 1.0]),
    ],
)
def test_each_variant_follows_its_hand_computed_steps_through_a_spike_after_a_reset(
    variant, by_hand, spike_seen, multipliers
):
    expected = by_hand(SPIKED)
    assert [e[4] for e in expected] == pytest.approx(multipliers, abs=1e-12)
    assert expected[4][3] == pytest.approx(spike_seen)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = AdamWSPAM([p], enable_clip=True, spam_variant=variant, clip_settle=2, **HAND)
    for t, (g, (p_t, m_t, v_t, g_t, _)) in enumerate(zip(SPIKED, expected), start=1):
        p.grad = torch.tensor([g])
        opt.step()
        assert p.grad.item() == pytest.approx(g_t, rel=1e-6), t  # the gradient the update used
        assert opt.state[p]["exp_avg"].item() == pytest.approx(m_t, rel=1e-6), t
        assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(v_t, rel=1e-6), t
        assert p.item() == pytest.approx(p_t, rel=1e-6), t
    assert opt.spam["resets"] == 1 and opt.param_groups[0]["lr"] == 0.1


def test_the_variants_differ_where_the_authors_code_does():
    ref, paper = reference_by_hand(SPIKED), paper_by_hand(SPIKED)
    assert ref[0][0] != pytest.approx(paper[0][0], rel=1e-4)  # eps placement and decay order, step 1
    assert ref[4][1] < paper[4][1] / 2  # the clipped spike moves m far less


def test_paper_settling_and_rewarmup_at_the_authors_settings():
    """20 settling steps at the start and after each reset (interval 500); re-warmup over W = 150."""
    assert [paper_clips(t, 500) for t in (1, 19, 20, 499, 500, 519, 520)] == [0, 0, 1, 1, 0, 0, 1]
    assert [paper_clips(t, 0) for t in (19, 20, 5000)] == [0, 1, 1]  # no resets: only the start
    assert paper_rewarmup_multiplier(500, 650, 150) == pytest.approx(0.01)
    last = paper_rewarmup_multiplier(649, 650, 150)  # c = 149 of a cosine over 151 steps
    assert last == pytest.approx(0.01 + 0.99 * 0.5 * (1 - math.cos(math.pi * 149 / 151)))
    assert last < 1.0 and paper_rewarmup_multiplier(650, 650, 150) == 1.0


def test_paper_variant_clips_in_step_after_the_global_clip_and_has_no_amsgrad():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdamWSPAM([p], enable_clip=True, spam_variant="paper", fused=True, interval=0, clip_settle=1)
    assert not opt.clips_gradients and not opt.skips_on_device  # the trainer's host check skips
    p.grad = torch.tensor([1.0])
    opt.step()
    p.grad = torch.tensor([1e6])
    opt.prepare_gradients()  # what the trainer calls before its global clip: no clipping there
    assert p.grad.item() == 1e6
    opt.step()
    assert p.grad.item() == pytest.approx(math.sqrt(50.0 * 0.001), rel=1e-6)  # sqrt(theta·v), in step
    with pytest.raises(ValueError, match="no AMSGrad"):
        AdamWSPAM([p], spam_variant="paper", amsgrad=True)


def test_a_paper_variant_run_resumes_exactly(tiny_flags, tmp_path):
    """In the trainer (host-side skip check, clipping inside the step): a run resumed mid-re-warmup
    from its checkpoint ends with the uninterrupted run's weights."""
    from gpt2.config import resolve
    from gpt2.trainer import checkpoint
    from gpt2.trainer.run import train_once

    flags = dict(
        tiny_flags,
        optimizer="adamwspam",
        spam_variant="paper",
        spam_enable_clip=True,
        spam_interval=4,
        spam_warmup_steps=3,
        save_checkpoint=True,
        checkpoint_interval=5,  # inside the re-warmup after the reset at step 4
        keep_checkpoints=2,
    )
    train_once(resolve(dict(flags, output_dir=str(tmp_path / "full"))))
    mid = tmp_path / "full" / checkpoint.step_name(5)
    train_once(resolve(dict(flags, output_dir=str(tmp_path / "resumed"), resume=str(mid))))
    a = checkpoint.load(tmp_path / "full" / checkpoint.LAST)
    b = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST)
    assert a["optimizer"]["spam"]["resets"] == 2  # at steps 4 and 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
