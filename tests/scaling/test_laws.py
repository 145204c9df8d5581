import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lmforge.scaling import BESIROGLU, CHINCHILLA, ParametricLaw, load_law
from lmforge.utils.errors import UserError


@pytest.mark.parametrize("law", [CHINCHILLA, BESIROGLU], ids=lambda law: law.name)
@pytest.mark.parametrize("C", [1e18, 1e21, 5.76e23, 1e26])
def test_closed_form_optimum_equals_numerical_minimum(law, C):
    """Minimise L(N, C / (6N)) over log N directly and compare with N = G (C/6)^a, D = G^-1 (C/6)^b."""
    res = minimize_scalar(
        lambda x: law.loss(math.exp(x), C / (6 * math.exp(x))),
        bounds=(0.0, math.log(C / 6)), method="bounded", options={"xatol": 1e-10},
    )
    N, D = law.optimum(C)
    assert N == pytest.approx(math.exp(res.x), rel=1e-4)
    assert D == pytest.approx(C / (6 * math.exp(res.x)), rel=1e-4)
    assert 6 * N * D == pytest.approx(C, rel=1e-12)


@pytest.mark.parametrize("law", [CHINCHILLA, BESIROGLU], ids=lambda law: law.name)
def test_inverses_of_the_optimum(law):
    N, D = law.optimum(3e22)
    assert law.tokens_for(N) == pytest.approx(D, rel=1e-10)
    assert law.params_for(D) == pytest.approx(N, rel=1e-10)
    assert law.a + law.b == pytest.approx(1.0)


def test_loss_takes_arrays():
    N, D = np.array([1e8, 1e9]), np.array([1e10, 1e11])
    np.testing.assert_allclose(CHINCHILLA.loss(N, D), [CHINCHILLA.loss(1e8, 1e10), CHINCHILLA.loss(1e9, 1e11)])
    assert CHINCHILLA.loss(1e9, 1e11) == pytest.approx(1.69 + 406.4 / 1e9**0.3392 + 410.7 / 1e11**0.2849)


def test_load_law_by_name_and_from_a_fit(tmp_path):
    assert load_law("chinchilla") is CHINCHILLA
    assert load_law("Besiroglu") is BESIROGLU
    assert load_law(CHINCHILLA) is CHINCHILLA
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"approach3": {"law": {"E": 2.0, "A": 300.0, "B": 900.0, "alpha": 0.3, "beta": 0.25}}}))
    law = load_law(path)
    assert (law.E, law.A, law.B, law.alpha, law.beta) == (2.0, 300.0, 900.0, 0.3, 0.25)
    assert law.name == f"fit:{path}"


def test_load_law_bad_input(tmp_path):
    with pytest.raises(UserError, match=r"unknown scaling law 'kaplan'; use one of \['besiroglu', 'chinchilla'\]"):
        load_law("kaplan")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_law(bad)
    bad.write_text(json.dumps({"kaplan": {}}))
    with pytest.raises(UserError, match="has no 'approach3' section"):
        load_law(bad)
    bad.write_text(json.dumps({"approach3": {"skipped": "approach 3 fits 5 parameters and needs >= 6 runs"}}))
    with pytest.raises(UserError, match=r"has no approach 3 law \(approach 3 fits 5 parameters"):
        load_law(bad)
    bad.write_text(json.dumps({"approach3": {"law": {"E": 2.0, "A": 300.0}}}))
    with pytest.raises(UserError, match="approach3.law must hold"):
        load_law(bad)
    with pytest.raises(UserError, match="alpha=-0.1 must be > 0"):
        ParametricLaw(E=1.0, A=1.0, B=1.0, alpha=-0.1, beta=0.3)
    # An int past float range (JSON reads 10**400 as an int): math.isfinite raised OverflowError on it.
    bad.write_text('{"approach3": {"law": {"E": 1' + "0" * 400 + ', "A": 400, "B": 410, "alpha": 0.3, "beta": 0.3}}}')
    with pytest.raises(UserError, match=r"E=100000000000000\.\.\. is not a finite number; fix its E"):
        load_law(bad)


def test_a_negative_irreducible_loss_is_refused(tmp_path):
    # Seen in review: a fit.json with E = -5 planned a predicted loss of -4.25 nats/token.
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"approach3": {"law": {"E": -5, "A": 400, "B": 410, "alpha": 0.3, "beta": 0.3}}}))
    with pytest.raises(UserError, match=r"E=-5 must be >= 0: it is the loss of an ideal model"):
        load_law(path)
    assert ParametricLaw(E=0.0, A=1.0, B=1.0, alpha=0.3, beta=0.3).loss(1.0, 1.0) == 2.0
