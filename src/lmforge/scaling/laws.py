"""Parametric scaling laws L(N, D) = E + A / N^alpha + B / D^beta and their compute-optimal frontier.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556), section 3.3
and appendix D.2; Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102).
N counts every parameter (embeddings included), D training tokens, and compute is C = 6 N D.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.scaling.runs import finite_number, short_repr
from lmforge.utils.errors import UserError


@dataclass(frozen=True)
class ParametricLaw:
    """Loss in nats/token of N parameters trained on D tokens: E + A / N^alpha + B / D^beta.

    E is the loss of an ideal model on the text (its entropy); A / N^alpha is what a finite model adds
    and B / D^beta what finite data adds (Hoffmann et al. 2022, eq. 2).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("E", "A", "B", "alpha", "beta"):
            value = getattr(self, key)
            if not finite_number(value):
                raise UserError(f"scaling law {self.name!r}: {key}={short_repr(value)} is not a finite number; fix its {key}")
        if self.E < 0:
            raise UserError(
                f"scaling law {self.name!r}: E={self.E:.4g} must be >= 0: it is the loss of an ideal model, the "
                "entropy of the text, which is never negative; refit the law or fix its E"
            )
        for key in ("A", "B", "alpha", "beta"):
            if getattr(self, key) <= 0:
                raise UserError(
                    f"scaling law {self.name!r}: {key}={getattr(self, key):.4g} must be > 0 for loss to fall with "
                    "size and data; refit it from runs over a wider range of sizes and token counts"
                )

    def loss(self, N, D):
        """Predicted loss; N and D may be numbers or numpy arrays."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    # The closed forms below are taken in log space: float ** raises OverflowError (alpha A alone
    # can overflow while G does not), and a result past float range comes back as inf for the
    # caller to refuse.
    @property
    def log_G(self) -> float:
        """log G, from the logs of the constants."""
        return (math.log(self.alpha) + math.log(self.A) - math.log(self.beta) - math.log(self.B)) / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)), the scale of the optimum (Hoffmann et al. 2022, eq. 4)."""
        return _exp(self.log_G)

    def optimum(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = C.

        Closed form of Hoffmann et al. 2022, eq. 4: N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b. Setting
        dL/dN = 0 along D = C / (6N) gives alpha A / N^alpha = beta B / D^beta, which solves to it.
        """
        log_x = math.log(C / 6.0)
        return _exp(self.log_G + self.a * log_x), _exp(self.b * log_x - self.log_G)

    def tokens_for(self, N: float) -> float:
        """The D for which N is the compute-optimal size: invert N = G (C/6)^a, then D = (C/6) / N."""
        return _exp((math.log(N) - self.log_G) / self.a - math.log(N))

    def params_for(self, D: float) -> float:
        """The N for which D is the compute-optimal token count: invert D = G^-1 (C/6)^b, then N = (C/6) / D."""
        return _exp((math.log(D) + self.log_G) / self.b - math.log(D))

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _exp(x: float) -> float:
    """exp(x), or inf past float range (where math.exp raises OverflowError)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# Hoffmann et al. 2022, approach 3 (eq. 10 prints alpha 0.34, beta 0.28); the unrounded exponents are
# those of the paper's TeX source, as Besiroglu et al. 2024 (v2) report them.
CHINCHILLA = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849, name="chinchilla")
# Besiroglu et al. 2024, table 1: the same approach refitted to the data recovered from Hoffmann's figure 4.
BESIROGLU = ParametricLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="besiroglu")

LAWS = {law.name: law for law in (CHINCHILLA, BESIROGLU)}


def load_law(law: str | os.PathLike | ParametricLaw) -> ParametricLaw:
    """A built-in law by name (`chinchilla`, `besiroglu`), or approach 3's law from a fit.json of `fit()`."""
    if isinstance(law, ParametricLaw):
        return law
    if str(law).lower() in LAWS:
        return LAWS[str(law).lower()]
    path = Path(law)
    if not path.is_file():
        raise UserError(
            f"unknown scaling law {str(law)!r}; use one of {sorted(LAWS)} or the path of a fit.json "
            "written by `lmforge scaling fit`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); pass a fit.json written by `lmforge scaling fit`") from None
    section = data.get("approach3") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise UserError(f"{path} has no 'approach3' section; pass a fit.json written by `lmforge scaling fit`")
    if "skipped" in section:
        raise UserError(f"{path} has no approach 3 law ({section['skipped']})")
    fitted = section.get("law")
    keys = ("E", "A", "B", "alpha", "beta")
    if not isinstance(fitted, dict) or any(k not in fitted for k in keys):
        raise UserError(
            f"{path}: approach3.law must hold {list(keys)}; rerun `lmforge scaling fit` to rewrite the file"
        )
    return ParametricLaw(**{k: fitted[k] for k in keys}, name=f"fit:{path}")
