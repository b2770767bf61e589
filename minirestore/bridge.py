"""Diffusion bridges for prompt training and sampling: EBR (the method) and the naive / DDBM baselines.

Notation (paper.md section 4): X0 = clean latent, Y = degraded latent of the same image, eps ~ N(0, I),
t = bridge time in [t_min, T0] (0 = clean). Every bridge state is linear in (X0, Y, eps):

    x_t = a(t) * X0 + A(t) * Y + B(t) * eps

and the frozen backbone, a rectified-flow model, reads it at its own time tau = model_time(t) and
returns a velocity v. Training is MSE(x0_hat, X0) on latents, with one of two clean estimates (`x0`):

  ypt      x0_hat = x_t - tau * v                          the released YPT code's (paper.md 4.3), default
  ebridge  x0_hat = (x_t - A(t) * Y - tau * v) / C(t),  C = 1 - A = a + B     the E-Bridge paper's (paper.md 9)

Both return the anchor the frozen model denoises to when it knows nothing of the degradation (an unprompted
model gives x0_hat = Y at t = T0 either way), and differ in the prompt's reach: a change dv in the velocity
moves x0_hat by -tau dv under ypt but by -tau dv / C(t) under ebridge, which is -dv at t = T0 (C(T0) = T0).
So under ypt the prompt must add the velocity offset (Y - X0) / T0 (paper.md 4.3), 50 times the residual at
T0 0.02, and under ebridge only Y - X0 whatever T0: a short bridge, which keeps the detail, still reaches.
But 1 / C(T0) multiplies the frozen model's own error as well (if it denoises the start state to Y + e, the
estimate is Y + e / T0), and no prompt cancels an error that changes with every noise draw: on the tiny
default ebridge lost 8.8 dB on blur at T0 0.05 and tied ypt on low light at T0 0.6 (benchmarks/photos/README.md,
"The E-Bridge paper's estimate"), so ypt is the default. ebridge needs the sampler to walk the training states,
so it goes with ebr and ddbm, not naive.

  ebr    X_t = (1 - t) * ((1 - t/T0) * X0 + (t/T0) * Y) + t * eps            (EBR "Eq. 10", YPT utils.py)
         a = (1 - t)(1 - t/T0), A = (1 - t) t/T0, B = t; tau = t.
         X_0 = X0; X_T0 = (1 - T0) Y + T0 eps, the degraded latent noised to level T0.
  naive  Z_t = (1 - t) * Y + t * eps: the ordinary forward process on the degraded latent
         a = 0, A = 1 - t, B = t; tau = t. Training states never leave the segment Y -> noise.
  ddbm   a Brownian bridge pinned at X0 (t = 0) and at the noise-free Y (t = T0):
             s = t/T0,  b(s) = sigma * sqrt(s (1 - s)),  X_t = (1 - s) X0 + s Y + b eps.
         Its noise-to-signal ratio is b, and a rectified-flow state (1 - tau) x + tau eps has ratio
         tau / (1 - tau); so the state is stored scaled by 1 / (1 + b), which puts it exactly on the
         frozen model's path at tau = b / (1 + b):
             x_t = (1 - tau) * ((1 - s) X0 + s Y) + tau * eps;  a = (1 - tau)(1 - s), A = (1 - tau) s,
             B = tau = model_time(t). Noise std tau vanishes at both ends (peak sigma/2 / (1 + sigma/2)).

Sampler (YPT utils.py `ebr_custom_multistep_sample`, paper.md 6): a linear grid t_i = linspace(T0, t_min, N),
start X = x_{T0}; each step x0_hat = X - tau_i v(X, tau_i), re-estimate the noise from the bridge equation
eps_hat = (X - a(t_i) x0_hat - A(t_i) Y) / max(B(t_i), t_min), and re-project onto the bridge at the next
time, X = a(t_{i+1}) x0_hat + A(t_{i+1}) Y + B(t_{i+1}) eps_hat (deterministic, DDIM-like). The output is
x0_hat at the last grid point, NFE = N. For naive this is the rectified-flow DDIM (= Euler) step
x = (1 - t') x0_hat + t' eps_hat started from (1 - T0) Y + T0 eps.

Adaptive T0 (issue 19; the paper's stated limitation is that T0 needs careful tuning). One horizon cannot
serve light and heavy degradations: X_T0 adds fresh noise of std T0, which a lightly noised image does not
need and a heavily noised one needs more of. `T0_range = (lo, hi)` trains one prompt over many horizons:
each sample draws T0 ~ U(lo, hi), then t in [t_min, T0] as above, and sits on EBR's bridge *for that T0*
(`at(T0)`); P and alpha see nothing new, the state itself tells the frozen model its time. At sampling
T0 is chosen per input (strength.py): estimate the degradation's strength s from the input alone (noise:
sigma_hat = median |HH| / 0.6745 of the finest Haar band, Donoho's MAD rule), then T0 = curve(s), a
piecewise-linear curve of the best T0 found on validation images at a ladder of strengths (train.py
measures it and stores it in the prompt file). Failure cases: sigma_hat reads fine texture as noise (a
clean, detailed photo gets a T0 above what it needs, which costs detail, not stability); noise that is
not white (JPEG'd or demosaicked noise, low light) is underestimated; degradations without an estimator
(blur, jpeg, haze, ...) get one calibrated T0, the best on average over their training strengths.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import UserError

KINDS = ("ebr", "naive", "ddbm")
X0_ESTIMATES = ("ypt", "ebridge")


@dataclass
class Bridge:
    kind: str = "ebr"     # "ebr" (the method), "naive" or "ddbm" (the baselines)
    T0: float = 0.4       # horizon: training and sampling live on [t_min, T0]; 0.4 in every released script
    t_min: float = 1e-4   # smallest time; also the floor of the noise re-estimate's divisor
    pow: float = 1.0      # t = t_min + (T0 - t_min) u^pow: 1 uniform, < 1 more mass near T0, > 1 near t_min
    sigma: float = 1.0    # ddbm only: Brownian-bridge noise scale, noise std b = sigma sqrt(s (1 - s))
    T0_range: tuple = None  # (lo, hi): train over horizons T0 ~ U(lo, hi), one per sample; T0 is then the
                            # sampling default (adaptive T0, see the module docstring)
    x0: str = "ypt"       # clean estimate from v: "ypt" x_t - tau v, or "ebridge" (x_t - A Y - tau v) / (1 - A)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown bridge {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.x0 not in X0_ESTIMATES:
            raise UserError(f"unknown clean estimate {self.x0!r}: choose one of {', '.join(X0_ESTIMATES)}")
        if self.x0 == "ebridge" and self.kind == "naive":  # its sampler leaves the training states (sampler_coeffs)
            raise UserError("the ebridge estimate subtracts the training state's A(t) Y, and the naive bridge's "
                            "sampler walks other states: train naive with --x0 ypt")
        if not 0.0 < self.T0 <= 1.0:
            raise UserError(f"T0 must be in (0, 1], got {self.T0}: pass e.g. --t0 0.4")
        if self.T0_range is not None:
            lo, hi = self.T0_range
            if not 0.0 < lo < hi <= 1.0:
                raise UserError(f"a T0 range must satisfy 0 < low < high <= 1, got {lo}:{hi}: pass e.g. --t0 0.1:0.8")
        if not 0.0 < self.t_min < min((self.T0, *(self.T0_range or ()))):
            raise UserError(f"t_min must be in (0, T0={self.T0}), got {self.t_min}")
        if self.pow <= 0:
            raise UserError(f"the time-sampling power must be positive, got {self.pow}")
        if self.sigma <= 0:
            raise UserError(f"the DDBM noise scale sigma must be positive, got {self.sigma}")

    @classmethod
    def from_meta(cls, meta, T0=None, T0_range=None):
        """The bridge a prompt file's metadata records (train.py writes it), at horizon T0 (default: the file's).
        Files from before the ebridge estimate have no "x0" entry: they were trained with ypt's."""
        return cls(meta.get("bridge", "ebr"), float(meta["T0"] if T0 is None else T0), float(meta.get("t_min", 1e-4)),
                   sigma=float(meta.get("ddbm_sigma", 1.0)), T0_range=T0_range, x0=meta.get("x0", "ypt"))

    # -- the state x_t = a X0 + A Y + B eps ----------------------------------------------------

    def model_time(self, t):
        """The frozen model's time tau for bridge time t (float or tensor): t itself for ebr and naive;
        for ddbm the noise level of its rescaled state, tau = b / (1 + b) (see the module docstring)."""
        if self.kind != "ddbm":
            return t
        s = t / self.T0
        s_1ms = s * (1 - s)
        b = self.sigma * (s_1ms.clamp(min=0).sqrt() if torch.is_tensor(t) else math.sqrt(max(s_1ms, 0.0)))
        return b / (1 + b)

    def coeffs(self, t):
        """(a, A, B) of x_t = a X0 + A Y + B eps, for float or tensor t (same type back)."""
        if self.kind == "ebr":
            lam = t / self.T0  # anchor slides from X0 (t = 0) to Y (t = T0)
            return (1 - t) * (1 - lam), (1 - t) * lam, t
        if self.kind == "naive":
            return 0 * t, 1 - t, t
        s, tau = t / self.T0, self.model_time(t)
        return (1 - tau) * (1 - s), (1 - tau) * s, tau

    def sampler_coeffs(self, t):
        """(a, A, B) of the states the sampler walks through. ebr and ddbm: their own bridge, so sampling
        states are training states. naive: the ordinary rectified-flow path of the estimate,
        (1 - t) x0_hat + t eps_hat, i.e. the usual sampler started from the noised degraded latent; its
        training states (1 - t) Y + t eps never leave the segment Y -> noise, which is the train/sample
        mismatch the paper blames for naive training's instability (paper.md 4.1)."""
        if self.kind == "naive":
            return 1 - t, 0 * t, t
        return self.coeffs(t)

    def make_state(self, X0, Y, t, eps):
        """Training state x_t for latents X0, Y, eps [B, ...] and times t [B] (or a float).
        Computed in fp32 (t near t_min and small coefficients), returned in X0's dtype."""
        a, A, B = (_per_sample(c, X0) for c in self.coeffs(_as_tensor(t, X0)))
        x_t = a * X0.float() + A * Y.float() + B * eps.float()
        return x_t.to(X0.dtype)

    def _A_x0(self, t, like):
        """The A(t) that the clean estimate subtracts, shaped against `like`: A(t) for ebridge, 0 for ypt."""
        if self.x0 == "ypt":
            return 0.0
        return _per_sample(self.coeffs(_as_tensor(t, like))[1], like)

    def velocity_target(self, x_t, t, X0, Y):
        """The velocity v* for which x0_hat = X0 exactly: tau v* = x_t - A Y - (1 - A) X0 (A = 0 for ypt).
        For ebr under ypt this is (eps - X0) + ((1 - t)/T0)(Y - X0) (paper.md 4.3)."""
        tau = _per_sample(self.model_time(_as_tensor(t, x_t)), x_t)
        A = self._A_x0(t, x_t)
        return ((x_t.float() - A * Y.float() - (1 - A) * X0.float()) / tau).to(x_t.dtype)

    def x0_from_velocity(self, x_t, t, v, Y):
        """x0_hat = (x_t - A Y - tau v) / (1 - A), with A = 0 for ypt (plain rectified flow, the released
        code's choice for EBR, paper.md 4.3) and A = A(t) for ebridge (the E-Bridge paper's, paper.md 9); the
        same for all three bridges, so they differ only in their states. t is the bridge time [B] or a float;
        Y the degraded latent; returned in fp32."""
        tau = _per_sample(self.model_time(_as_tensor(t, x_t)), x_t)
        if self.x0 == "ypt":
            return x_t.float() - tau * v.float()
        A = self._A_x0(t, x_t)
        return (x_t.float() - A * Y.float() - tau * v.float()) / (1 - A)

    @staticmethod
    def loss(x0_hat, X0):
        """MSE on latents, || x0_hat - X0 ||^2 averaged over all elements (= tau^2 || v - F* ||^2)."""
        return F.mse_loss(x0_hat.float(), X0.float())

    # -- training time --------------------------------------------------------------------------

    def sample_t(self, batch, generator=None, device=None):
        """t = t_min + (T0 - t_min) u^pow, u ~ U(0, 1): a [batch] fp32 tensor in [t_min, T0].
        Drawn on the generator's device (CPU when none) and moved to `device`."""
        gdev = generator.device if generator is not None else (device or "cpu")
        u = torch.rand(batch, generator=generator, device=gdev)
        return (self.t_min + (self.T0 - self.t_min) * u**self.pow).to(device or gdev)

    def sample_T0_t(self, batch, generator=None, device=None):
        """Training horizons and times -> (T0 [batch], t [batch]). A fixed T0: T0 everywhere and t from
        sample_t (the same draws as without a range). A range (lo, hi): T0 ~ U(lo, hi) first, then
        t = t_min + (T0 - t_min) u^pow from a second draw, so t always lies in [t_min, T0]."""
        gdev = generator.device if generator is not None else (device or "cpu")
        if self.T0_range is None:
            return torch.full((batch,), float(self.T0), device=device or gdev), self.sample_t(batch, generator, device)
        lo, hi = self.T0_range
        T0 = lo + (hi - lo) * torch.rand(batch, generator=generator, device=gdev)
        return T0.to(device or gdev), self.at(T0).sample_t(batch, generator, device)

    def at(self, T0):
        """This bridge at horizon T0: a float, or a [B] tensor of per-sample horizons (every method above
        then works per sample, broadcasting T0 against t). No range: its states are the fixed-T0 bridge's."""
        b = copy.copy(self)
        b.T0, b.T0_range = T0, None
        return b

    # -- sampling -------------------------------------------------------------------------------

    def grid(self, steps):
        """The bridge times where the model is queried: linspace(T0, t_min, steps) (YPT's linear grid).
        ddbm starts at the noise-free Y, where tau = 0 and the model can say nothing, so its grid is
        linspace(T0, t_min, steps + 1) without the first point (still `steps` evaluations)."""
        if steps < 1:
            raise UserError(f"the sampler needs at least 1 step, got {steps}")
        if self.kind == "ddbm":
            return torch.linspace(self.T0, self.t_min, steps + 1, dtype=torch.float64)[1:].tolist()
        if steps == 1:
            return [self.T0]
        return torch.linspace(self.T0, self.t_min, steps, dtype=torch.float64).tolist()

    @torch.no_grad()
    def sample(self, velocity_fn, Y, steps=20, eps=None, generator=None, progress=False):
        """Restore latents Y [B, ...] with `steps` model evaluations; returns x0_hat in fp32.

        velocity_fn(x, tau) -> v: x is the current state (fp32, Y's shape), tau a [B] fp32 tensor of
        the frozen model's times (already mapped through model_time, so callers pass it straight to the
        backbone). For mixed degradations pass a function that returns the average velocity of
        several prompt sets (`averaged`). eps: the start noise (default drawn with `generator`).
        """
        Y = Y.float()
        if eps is None:
            gdev = generator.device if generator is not None else Y.device
            eps = torch.randn(Y.shape, generator=generator, device=gdev).to(Y.device)
        eps = eps.float()
        ts = self.grid(steps)
        # ebr: X_T0 = (1 - T0) Y + T0 eps; naive: Z_T0, the same latent. ddbm: the state at its first
        # interior time ts[0] with x0 guessed as Y, its only information at the pinned end, i.e.
        # (1 - tau) Y + tau eps: DDBM's first (stochastic) step.
        X = self.make_state(Y, Y, ts[0], eps)
        for i, t in enumerate(tqdm(ts, desc="sampling", disable=not progress)):
            tau = torch.full((Y.shape[0],), float(self.model_time(t)), device=Y.device)
            x0_hat = self.x0_from_velocity(X, t, velocity_fn(X, tau), Y)
            if i + 1 == len(ts):
                break
            a, A, B = self.sampler_coeffs(t)
            eps_hat = (X - a * x0_hat - A * Y) / max(B, self.t_min)
            a, A, B = self.sampler_coeffs(ts[i + 1])
            X = a * x0_hat + A * Y + B * eps_hat
        return x0_hat


def averaged(velocity_fns):
    """Mixed degradations (YPT): one velocity function that averages several prompt sets' velocities."""
    fns = list(velocity_fns)
    return lambda x, tau: sum(f(x, tau).float() for f in fns) / len(fns)


def _as_tensor(t, like):
    return torch.as_tensor(t, dtype=torch.float32, device=like.device)


def _per_sample(c, x):
    """A coefficient (scalar or [B]) shaped to broadcast against x [B, ...]."""
    c = torch.as_tensor(c, dtype=torch.float32, device=x.device)
    return c.reshape(-1, *[1] * (x.dim() - 1)) if c.dim() else c
