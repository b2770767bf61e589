"""Bridge identities (paper.md 4 and 6): endpoints, noise level, implied velocity target, sampler exactness."""
import math

import pytest
import torch

from minirestore import UserError
from minirestore.bridge import KINDS, X0_ESTIMATES, Bridge, averaged

SHAPE = (3, 4, 6, 5)  # [B, C, H, W] latents; the bridge is shape-agnostic


def latents(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    X0, Y, eps = (torch.randn(shape, generator=g) for _ in range(3))
    return X0, Y + 0.5, eps  # Y offset so X0 and Y are clearly different


# every bridge with every clean estimate it takes (naive + ebridge is refused: test_bad_settings_are_user_errors)
PAIRS = [(kind, x0) for kind in KINDS for x0 in X0_ESTIMATES if (kind, x0) != ("naive", "ebridge")]


def full(t, n=SHAPE[0]):
    return torch.full((n,), float(t))


@pytest.mark.parametrize("kind", KINDS)
def test_state_matches_written_out_equation(kind):
    X0, Y, eps = latents()
    br = Bridge(kind, T0=0.5, sigma=0.8)
    t = torch.tensor([0.05, 0.2, 0.45])
    x_t = br.make_state(X0, Y, t, eps)
    tt = t.view(-1, 1, 1, 1)
    if kind == "ebr":
        ref = (1 - tt) * ((1 - tt / 0.5) * X0 + (tt / 0.5) * Y) + tt * eps
    elif kind == "naive":
        ref = (1 - tt) * Y + tt * eps
    else:  # Brownian bridge X0 + s (Y - X0) + b eps, scaled by 1 / (1 + b)
        s = tt / 0.5
        b = 0.8 * torch.sqrt(s * (1 - s))
        ref = ((1 - s) * X0 + s * Y + b * eps) / (1 + b)
    torch.testing.assert_close(x_t, ref, rtol=1e-6, atol=1e-6)


def test_endpoints():
    X0, Y, eps = latents()
    T0 = 0.4
    ebr, naive, ddbm = Bridge("ebr", T0), Bridge("naive", T0), Bridge("ddbm", T0)
    torch.testing.assert_close(ebr.make_state(X0, Y, 0.0, eps), X0)
    torch.testing.assert_close(ebr.make_state(X0, Y, T0, eps), (1 - T0) * Y + T0 * eps)
    torch.testing.assert_close(naive.make_state(X0, Y, 0.0, eps), Y)  # anchored at the degraded latent
    torch.testing.assert_close(naive.make_state(X0, Y, T0, eps), (1 - T0) * Y + T0 * eps)
    torch.testing.assert_close(ddbm.make_state(X0, Y, 0.0, eps), X0)  # pinned, noise-free at both ends
    torch.testing.assert_close(ddbm.make_state(X0, Y, T0, eps), Y)
    assert ddbm.model_time(0.0) == 0.0 and abs(ddbm.model_time(T0)) < 1e-12
    assert ddbm.model_time(T0 / 2) > 0.1  # noise in between


@pytest.mark.parametrize("kind", KINDS)
def test_noise_std_equals_model_time(kind):
    """Analytically: B(t) = tau (the frozen model's noise level) and the signal coefficients sum to 1 - tau,
    i.e. every state lies on the rectified-flow path. Empirically: std over eps of x_t is tau."""
    br = Bridge(kind, T0=0.6, sigma=1.5)
    for t in (0.01, 0.2, 0.35, 0.59):
        a, A, B = br.coeffs(t)
        tau = br.model_time(t)
        assert B == pytest.approx(tau, abs=1e-12)
        assert a + A == pytest.approx(1 - tau, abs=1e-12)
        if kind != "ddbm":
            assert tau == t
    X0, Y, _ = latents(shape=(1, 1, 8, 8))
    n = 20000
    eps = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.full((n,), 0.3)
    x_t = br.make_state(X0.expand(n, -1, -1, -1), Y.expand(n, -1, -1, -1), t, eps)
    std = x_t.std(dim=0)
    tau = float(br.model_time(torch.tensor(0.3)))
    assert abs(std.mean().item() - tau) < 0.01 * tau + 1e-3
    a, A, _ = br.coeffs(0.3)
    se = tau / math.sqrt(n)  # standard error of the mean
    torch.testing.assert_close(x_t.mean(dim=0), (a * X0 + A * Y)[0], atol=5 * se, rtol=0)


@pytest.mark.parametrize("kind, x0", PAIRS)
def test_velocity_target_recovers_x0(kind, x0):
    X0, Y, eps = latents()
    br = Bridge(kind, T0=0.4, x0=x0)
    t = br.sample_t(SHAPE[0], torch.Generator().manual_seed(3)).clamp(max=0.39)
    x_t = br.make_state(X0, Y, t, eps)
    v = br.velocity_target(x_t, t, X0, Y)
    torch.testing.assert_close(br.x0_from_velocity(x_t, t, v, Y), X0, rtol=1e-5, atol=1e-5)
    assert br.loss(br.x0_from_velocity(x_t, t, v, Y), X0).item() < 1e-10
    assert br.loss(br.x0_from_velocity(x_t, t, torch.zeros_like(v), Y), X0).item() > 1e-3
    tt = t.view(-1, 1, 1, 1)
    if kind == "ebr" and x0 == "ypt":  # F* = (eps - X0) + ((1 - t)/T0)(Y - X0), paper.md 4.3
        torch.testing.assert_close(v, eps - X0 + (1 - tt) / 0.4 * (Y - X0), rtol=1e-4, atol=1e-4)
    if kind == "ebr" and x0 == "ebridge":  # tau v* = x_t - A Y - C X0 = t (eps - X0): the plain RF target
        torch.testing.assert_close(v, eps - X0, rtol=1e-4, atol=1e-4)
    if kind == "naive" and x0 == "ypt":  # ordinary RF target eps - X0 plus the pull from Y to X0
        torch.testing.assert_close(v, eps - Y + (Y - X0) / tt, rtol=1e-4, atol=1e-4)


def test_x0_from_velocity_written_out():
    X0, Y, v = latents()
    t = torch.tensor([0.1, 0.2, 0.3])
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(Bridge("ebr").x0_from_velocity(X0, t, v, Y), X0 - tt * v)  # plain rectified flow
    ddbm = Bridge("ddbm")
    tau = ddbm.model_time(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(ddbm.x0_from_velocity(X0, t, v, Y), X0 - tau * v)
    A = (1 - tt) * tt / 0.4  # EBR's A(t) at T0 0.4; C = 1 - A (paper.md 9)
    ebridge = Bridge("ebr", x0="ebridge")
    torch.testing.assert_close(ebridge.x0_from_velocity(X0, t, v, Y), (X0 - A * Y - tt * v) / (1 - A))


def test_ebridge_estimate_gives_the_prompt_full_reach_at_T0():
    """At t = T0 both estimates give Y for the unprompted model's velocity eps - Y (the frozen model
    denoises the start state to the degraded image), but a velocity change dv moves x0_hat by -T0 dv under
    ypt and by the whole -dv under ebridge: the offset a prompt must add is (Y - X0) / T0 against Y - X0."""
    X0, Y, eps = latents()
    dv = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    T0 = 0.05
    x = Bridge("ebr", T0=T0).make_state(X0, Y, T0, eps)
    for x0, reach in (("ypt", T0), ("ebridge", 1.0)):
        br = Bridge("ebr", T0=T0, x0=x0)
        torch.testing.assert_close(br.x0_from_velocity(x, T0, eps - Y, Y), Y, rtol=1e-4, atol=1e-4)
        moved = br.x0_from_velocity(x, T0, eps - Y + dv, Y) - br.x0_from_velocity(x, T0, eps - Y, Y)
        torch.testing.assert_close(moved, -reach * dv, rtol=1e-4, atol=1e-4)
        needed = br.velocity_target(x, T0, X0, Y) - (eps - Y)  # what the prompt has to add
        torch.testing.assert_close(needed, (Y - X0) / (T0 if x0 == "ypt" else 1.0), rtol=1e-4, atol=1e-4)


def test_from_meta_reads_what_train_writes():
    meta = {"bridge": "ddbm", "T0": "0.3", "t_min": "0.001", "ddbm_sigma": "3", "x0": "ebridge"}
    br = Bridge.from_meta(meta)
    assert (br.kind, br.T0, br.t_min, br.sigma, br.x0) == ("ddbm", 0.3, 0.001, 3.0, "ebridge")
    assert Bridge.from_meta(meta, T0=0.5).T0 == 0.5
    old = Bridge.from_meta({"T0": "0.4"})  # a file from before the ebridge estimate
    assert (old.kind, old.x0) == ("ebr", "ypt")


@pytest.mark.parametrize("kind, x0", PAIRS)
@pytest.mark.parametrize("steps", [1, 2, 20])
def test_sampler_returns_x0_with_ideal_model(kind, steps, x0):
    X0, Y, eps = latents()
    br = Bridge(kind, T0=0.4, x0=x0)
    seen = []

    def ideal(x, tau):  # the ideal velocity given the true X0, at the grid time the sampler is at
        seen.append(tau.clone())
        assert tau.shape == (SHAPE[0],) and x.shape == SHAPE
        return br.velocity_target(x, br.grid(steps)[len(seen) - 1], X0, Y)

    out = br.sample(ideal, Y, steps=steps, eps=eps)
    assert len(seen) == steps  # NFE = steps
    torch.testing.assert_close(out, X0, rtol=1e-5, atol=1e-5)
    grid = br.grid(steps)
    assert grid == sorted(grid, reverse=True) and len(grid) == steps
    assert [s[0].item() for s in seen] == pytest.approx([float(br.model_time(t)) for t in grid], rel=1e-6)
    if steps > 1 or kind == "ddbm":
        assert grid[-1] == pytest.approx(br.t_min)
    if kind != "ddbm":
        assert grid[0] == pytest.approx(0.4)  # ebr / naive query the model at T0 first (one step: only there)


def test_naive_sampler_is_the_usual_rectified_flow_sampler():
    """naive starts from the noised degraded latent and then re-projects onto the rectified-flow path of
    its estimate, x' = (1 - t') x0_hat + t' eps_hat, with eps_hat = (x - (1 - t) x0_hat) / t; written out
    by hand for three steps with a non-ideal velocity."""
    X0, Y, eps = latents()
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    T0, t_min = 0.4, 1e-4
    out = Bridge("naive", T0=T0, t_min=t_min).sample(lambda x, tau: v * (1 + tau.view(-1, 1, 1, 1)), Y, 3, eps=eps)
    X = (1 - T0) * Y + T0 * eps
    t0, t1, t2 = T0, (T0 + t_min) / 2, t_min
    for t, t_next in ((t0, t1), (t1, t2)):
        x0 = X - t * v * (1 + t)
        eps_hat = (X - (1 - t) * x0) / t
        X = (1 - t_next) * x0 + t_next * eps_hat
    torch.testing.assert_close(out, X - t2 * v * (1 + t2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ebr"])
def test_sampler_stays_on_the_bridge(kind):
    """With the ideal model, eps_hat re-estimates the start noise exactly, so every state the sampler
    queries is the training state make_state(X0, Y, t_i, eps): training and sampling see the same family."""
    X0, Y, eps = latents()
    br = Bridge(kind, T0=0.4)
    grid = br.grid(6)
    assert grid[0] == pytest.approx(0.4) and grid[-1] == pytest.approx(1e-4)
    assert all(abs((grid[i] - grid[i + 1]) - (grid[0] - grid[1])) < 1e-9 for i in range(5))  # linear
    states = []

    def ideal(x, tau):
        states.append(x.clone())
        return (x - X0) / tau.view(-1, 1, 1, 1)

    br.sample(ideal, Y, steps=6, eps=eps)
    for x, t in zip(states, grid):
        torch.testing.assert_close(x, br.make_state(X0, Y, t, eps), rtol=1e-5, atol=1e-5)


def test_ddbm_sampler_starts_from_noised_degraded_latent():
    X0, Y, eps = latents()
    br = Bridge("ddbm", T0=0.4)
    grid = br.grid(4)
    assert grid[0] < 0.4 and grid[-1] == pytest.approx(1e-4)
    first = []
    br.sample(lambda x, tau: first.append(x.clone()) or (x - X0) / tau.view(-1, 1, 1, 1), Y, steps=4, eps=eps)
    tau = br.model_time(grid[0])
    torch.testing.assert_close(first[0], (1 - tau) * Y + tau * eps)
    # after the first step it is back on the bridge (with a re-estimated noise)
    a, A, B = br.coeffs(grid[1])
    eps_hat = (first[1] - a * X0 - A * Y) / B
    assert torch.isfinite(eps_hat).all()


def test_sampler_with_averaged_velocities_and_a_real_update():
    """Mixed degradations: the sampler consumes an averaged velocity. Two ideal predictors for different
    targets average to the ideal predictor of the mean target."""
    X0, Y, eps = latents()
    X1 = X0 + 1.0
    br = Bridge("ebr")
    fns = [lambda x, tau, T=T: (x - T) / tau.view(-1, 1, 1, 1) for T in (X0, X1)]
    out = br.sample(averaged(fns), Y, steps=5, eps=eps)
    torch.testing.assert_close(out, X0 + 0.5, rtol=1e-5, atol=1e-5)


def test_sampler_by_hand():
    """Three steps with a fixed non-ideal velocity, written out: catches a wrong coefficient anywhere in
    the re-projection (with the ideal model eps_hat is always the true eps, which would hide it)."""
    X0, Y, eps = latents()
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    T0, t_min = 0.4, 1e-4
    br = Bridge("ebr", T0=T0, t_min=t_min)
    out = br.sample(lambda x, tau: v * (1 + tau.view(-1, 1, 1, 1)), Y, steps=3, eps=eps)
    a = lambda t: (1 - t) * (1 - t / T0)  # noqa: E731
    A = lambda t: (1 - t) * t / T0  # noqa: E731
    X = (1 - T0) * Y + T0 * eps
    t0, t1, t2 = T0, (T0 + t_min) / 2, t_min
    for t, t_next in ((t0, t1), (t1, t2)):
        x0 = X - t * v * (1 + t)
        eps_hat = (X - a(t) * x0 - A(t) * Y) / t
        X = a(t_next) * x0 + A(t_next) * Y + t_next * eps_hat
    torch.testing.assert_close(out, X - t2 * v * (1 + t2), rtol=1e-5, atol=1e-5)


def test_sample_t_range_and_skew():
    g = torch.Generator().manual_seed(0)
    uni = Bridge(T0=0.4, t_min=1e-4).sample_t(50000, g)
    assert uni.shape == (50000,) and uni.dtype == torch.float32
    assert uni.min() >= 1e-4 and uni.max() <= 0.4
    assert abs(uni.mean().item() - (0.4 + 1e-4) / 2) < 0.003
    late = Bridge(T0=0.4, pow=3.0).sample_t(50000, g)  # u^3: mass near t_min
    early = Bridge(T0=0.4, pow=0.3).sample_t(50000, g)  # mass near T0
    assert late.min() >= 1e-4 and early.max() <= 0.4
    assert late.mean() < uni.mean() - 0.05 < early.mean() - 0.1
    # E[u^p] = 1 / (p + 1)
    assert abs(late.mean().item() - (1e-4 + (0.4 - 1e-4) / 4)) < 0.003
    a = Bridge().sample_t(8, torch.Generator().manual_seed(5))
    b = Bridge().sample_t(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_shapes_and_dtypes_preserved(dtype):
    for shape in [(2, 16, 4, 4), (2, 10, 64), (2, 16, 3, 4, 4)]:  # image latent, packed tokens, video latent
        X0, Y, eps = (x.to(dtype) for x in latents(shape=shape))
        for kind in KINDS:
            br = Bridge(kind)
            t = br.sample_t(shape[0])
            x_t = br.make_state(X0, Y, t, eps)
            assert x_t.shape == shape and x_t.dtype == dtype
            assert br.velocity_target(x_t, t, X0, Y).dtype == dtype
            out = br.sample(lambda x, tau: torch.zeros_like(x, dtype=dtype), Y, steps=3,
                            generator=torch.Generator().manual_seed(0))
            assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sampler_noise_from_generator_is_reproducible():
    X0, Y, _ = latents()
    br = Bridge()
    f = lambda x, tau: x * 0.3  # noqa: E731
    a = br.sample(f, Y, steps=4, generator=torch.Generator().manual_seed(42))
    b = br.sample(f, Y, steps=4, generator=torch.Generator().manual_seed(42))
    c = br.sample(f, Y, steps=4, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(kind="sde"), dict(T0=0.0), dict(T0=1.5), dict(t_min=0.5),
                                    dict(pow=0.0), dict(kind="ddbm", sigma=-1.0), dict(x0="eps"),
                                    dict(kind="naive", x0="ebridge")])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Bridge(**kwargs)
    with pytest.raises(UserError):
        Bridge().grid(0)


# -- adaptive T0: training over a range of horizons (issue 19) ----------------------------------------

@pytest.mark.parametrize("kind, x0", PAIRS)
def test_range_bridge_at_drawn_T0_equals_fixed_bridge(kind, x0):
    """Per-sample horizons: the states, velocity targets and x0 estimates of the range bridge at the T0 it
    drew are those of the fixed-T0 bridge at that T0, sample by sample."""
    X0, Y, eps = latents(4)
    br = Bridge(kind, T0=0.45, sigma=0.8, T0_range=(0.1, 0.8), x0=x0)
    T0, t = br.sample_T0_t(SHAPE[0], torch.Generator().manual_seed(6))
    assert ((T0 >= 0.1) & (T0 <= 0.8)).all() and ((t >= br.t_min) & (t <= T0)).all()
    ranged = br.at(T0)
    x_t, v = ranged.make_state(X0, Y, t, eps), torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    F_star, x0_hat = ranged.velocity_target(x_t, t, X0, Y), ranged.x0_from_velocity(x_t, t, v, Y)
    for i in range(SHAPE[0]):
        fixed = Bridge(kind, T0=T0[i].item(), sigma=0.8, x0=x0)
        ti = t[i:i + 1]
        torch.testing.assert_close(x_t[i:i + 1], fixed.make_state(X0[i:i + 1], Y[i:i + 1], ti, eps[i:i + 1]))
        torch.testing.assert_close(F_star[i:i + 1], fixed.velocity_target(x_t[i:i + 1], ti, X0[i:i + 1], Y[i:i + 1]))
        torch.testing.assert_close(x0_hat[i:i + 1], fixed.x0_from_velocity(x_t[i:i + 1], ti, v[i:i + 1], Y[i:i + 1]))
        assert float(ranged.model_time(t)[i]) == pytest.approx(float(fixed.model_time(ti)), rel=1e-6)


def test_range_draws_cover_the_range_and_fixed_T0_draws_are_unchanged():
    g = torch.Generator().manual_seed(8)
    T0, t = Bridge(T0=0.45, T0_range=(0.1, 0.8)).sample_T0_t(20000, g)
    assert abs(T0.mean().item() - 0.45) < 0.01 and T0.min() < 0.11 and T0.max() > 0.79  # U(0.1, 0.8)
    assert (t <= T0).all() and abs((t / T0).mean().item() - 0.5) < 0.01  # t uniform on [t_min, T0] given T0
    fixed = Bridge(T0=0.4)
    T0, t = fixed.sample_T0_t(8, torch.Generator().manual_seed(5))
    assert (T0 == 0.4).all() and torch.equal(t, fixed.sample_t(8, torch.Generator().manual_seed(5)))
    assert fixed.at(0.4) == fixed  # no range: at() is the same bridge


@pytest.mark.parametrize("lo_hi", [(0.5, 0.2), (0.0, 0.5), (0.3, 1.2)])
def test_bad_T0_range_is_a_user_error(lo_hi):
    with pytest.raises(UserError, match="T0 range"):
        Bridge(T0=0.4, T0_range=lo_hi)


def test_sample_py_takes_the_estimate_from_the_prompt_file_and_refuses_a_mix():
    """restore.bridge_for (sample.py's): a prompt trained with --x0 ebridge is sampled with that estimate (it
    was trained to it), one from before the flag with ypt's; averaging the velocities of prompts trained to
    different estimates would average two different quantities, so a mix is refused by name."""
    from minirestore.prompts import PromptBank
    from minirestore.restore import bridge_for

    def bank(**meta):
        b = PromptBank(2, 4, 1)
        b.meta = {"bridge": "ebr", "T0": "0.2", **meta}
        return b

    assert bridge_for([bank(x0="ebridge")])[0].x0 == "ebridge"
    assert bridge_for([bank()])[0].x0 == "ypt"
    assert bridge_for([bank(x0="ebridge")], t0=0.5)[0].T0 == 0.5
    with pytest.raises(UserError, match="ebridge"):
        bridge_for([bank(), bank(x0="ebridge")])
