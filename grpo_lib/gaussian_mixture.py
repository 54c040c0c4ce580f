r"""A Gaussian-mixture "data set" whose noisy marginals, score and flow-matching velocity are exact.

Data x_0 ~ sum_k w_k N(m_k, s_k^2 I) in D dimensions, noise eps ~ N(0, I). With the noise level
sigma (= t for ``noise_at_one``, = 1 - t for ``noise_at_zero``) the interpolant is
x = (1 - sigma) x_0 + sigma eps, so each component stays Gaussian:

    p_sigma(x)            = sum_k w_k N(x; (1 - sigma) m_k, V_k I),      V_k = (1 - sigma)^2 s_k^2 + sigma^2
    grad log p_sigma(x)   = - sum_k r_k(x) (x - (1 - sigma) m_k) / V_k,  r_k = posterior responsibility
    E[eps | x, k]         = sigma / V_k (x - (1 - sigma) m_k)
    E[x_0 | x, k]         = m_k + (1 - sigma) s_k^2 / V_k (x - (1 - sigma) m_k)
    v_sd3(x) = dx/dsigma  = E[eps - x_0 | x] = sum_k r_k [ (sigma - (1 - sigma) s_k^2) / V_k (x - (1-sigma) m_k) - m_k ]

and in Show-o2's convention v = dx/dt = -v_sd3. Every formula is finite on the whole of [0, 1]
(V_k > 0 because s_k > 0), so the velocity can be evaluated at the pure-noise and the data end.

| code        | symbol                               |
|-------------|--------------------------------------|
| ``weights`` | w_k (sum to 1), shape (K,)           |
| ``means``   | m_k, shape (K, D)                    |
| ``stds``    | s_k (isotropic), shape (K,)          |
| ``sigma``   | noise level of x (SD3 time)          |

The velocity field serves as an exact "model" for sampling checks (notebook 00): an ODE/SDE sampler
driven by it must reproduce the mixture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sde import check_convention


def _noise_level(t, convention: str, n: int, dtype, device) -> torch.Tensor:
    """Convention time (float or (N,)) -> noise level sigma as (N, 1)."""
    check_convention(convention)
    tt = torch.as_tensor(t, dtype=dtype, device=device)
    if tt.dim() == 0:
        tt = tt.expand(n)
    if tt.shape != (n,):
        raise ValueError(f"t has shape {tuple(tt.shape)}; expected a float or shape ({n},)")
    if (tt < 0).any() or (tt > 1).any():
        raise ValueError(f"t={tt.tolist() if n <= 8 else '...'} must lie in [0, 1]")
    sigma = tt if convention == "noise_at_one" else 1 - tt
    return sigma.unsqueeze(-1)                                   # (N, 1)


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture with closed-form noisy marginals (see module docstring)."""

    weights: torch.Tensor   # (K,)
    means: torch.Tensor     # (K, D)
    stds: torch.Tensor      # (K,)

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64)
        k = self.weights.shape[0]
        if self.means.dim() != 2 or self.means.shape[0] != k or self.stds.shape != (k,):
            raise ValueError(f"weights {tuple(self.weights.shape)}, means {tuple(self.means.shape)}, "
                             f"stds {tuple(self.stds.shape)}: expected (K,), (K, D), (K,)")
        if (self.weights < 0).any() or not math.isclose(self.weights.sum().item(), 1.0, abs_tol=1e-9):
            raise ValueError(f"weights={self.weights.tolist()} must be >= 0 and sum to 1")
        if (self.stds <= 0).any():
            raise ValueError(f"stds={self.stds.tolist()} must be > 0")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -------------------------------------------------------------- sampling
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ p_data, (n, D) float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)   # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * z

    def sample_marginal(self, n: int, t, convention: str = "noise_at_one",
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = (1 - sigma) x_0 + sigma eps ~ p_t, (n, D) float64."""
        sigma = _noise_level(t, convention, n, torch.float64, "cpu")
        x0 = self.sample_data(n, generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (1 - sigma) * x0 + sigma * eps

    # -------------------------------------------------------------- closed forms
    def _components(self, x: torch.Tensor, t, convention: str):
        x = x.to(torch.float64)
        sigma = _noise_level(t, convention, x.shape[0], torch.float64, x.device)            # (N, 1)
        centre = (1 - sigma).unsqueeze(-1) * self.means.to(x.device)                         # (N, K, D)
        var = (1 - sigma) ** 2 * self.stds.to(x.device) ** 2 + sigma ** 2                    # (N, K)
        diff = x.unsqueeze(1) - centre                                                       # (N, K, D)
        log_comp = (torch.log(self.weights.to(x.device)) - 0.5 * (diff ** 2).sum(-1) / var
                    - 0.5 * self.dim * torch.log(2 * math.pi * var))                         # (N, K)
        return sigma, var, diff, log_comp

    def log_prob(self, x: torch.Tensor, t, convention: str = "noise_at_one") -> torch.Tensor:
        """log p_t(x), (N,) float64; differentiable in x (autograd gives the exact score)."""
        _, _, _, log_comp = self._components(x, t, convention)
        return torch.logsumexp(log_comp, dim=-1)

    def score(self, x: torch.Tensor, t, convention: str = "noise_at_one") -> torch.Tensor:
        """grad_x log p_t(x) = -sum_k r_k (x - (1 - sigma) m_k) / V_k, (N, D) float64."""
        _, var, diff, log_comp = self._components(x, t, convention)
        r = torch.softmax(log_comp, dim=-1)                                                  # (N, K)
        return -(r.unsqueeze(-1) * diff / var.unsqueeze(-1)).sum(1)

    def velocity(self, x: torch.Tensor, t, convention: str = "noise_at_one") -> torch.Tensor:
        """The exact flow-matching velocity E[dx/dt | x_t = x] in the convention's sign, (N, D) float64."""
        sigma, var, diff, log_comp = self._components(x, t, convention)
        r = torch.softmax(log_comp, dim=-1)                                                  # (N, K)
        coef = (sigma - (1 - sigma) * self.stds.to(x.device) ** 2) / var                     # (N, K)
        v_sd3 = (r.unsqueeze(-1) * (coef.unsqueeze(-1) * diff - self.means.to(x.device))).sum(1)
        return v_sd3 if convention == "noise_at_one" else -v_sd3


def default_mixture() -> GaussianMixture:
    """A 2-D, 4-component mixture with unequal weights and widths (multi-modal, asymmetric)."""
    return GaussianMixture(
        weights=[0.35, 0.25, 0.25, 0.15],
        means=[[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0], [2.5, 2.5]],
        stds=[0.35, 0.5, 0.3, 0.25],
    )
