import gemmi
import numpy as np
import pytest

import modelmap as mm


def test_electron_table_is_gemmi_c4322():
    t = mm.get_table("electron")
    for z in (1, 6, 7, 8, 16, 26, 79):
        el = gemmi.Element(z)
        np.testing.assert_allclose(np.asarray(t.a[z]), el.c4322.a, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(t.b[z]), el.c4322.b, rtol=1e-6)


def test_xray_table_is_gemmi_it92_with_constant_as_b0_gaussian():
    t = mm.get_table("xray")  # the default float32 table
    el = gemmi.Element("S")
    s = np.linspace(0, 1.5, 7)  # 1/d in 1/Å
    expected = [el.it92.calculate_sf(float(v / 2) ** 2) for v in s]  # gemmi takes (sinθ/λ)²
    # gemmi stores float32 coefficients; float32 evaluation: measured max relative difference 8e-8
    np.testing.assert_allclose(np.asarray(t(16, s)), expected, rtol=1e-6)
    # f(0) = number of electrons (to the fit's accuracy)
    assert abs(float(t.f0(16)) - 16) < 0.01


@pytest.mark.x64
def test_electron_f0_of_carbon():
    t = mm.get_table("electron", dtype=np.float64)
    # ITC 4.3.2.2 carbon: f(0) = sum a_k = 2.5088 Å
    assert float(t.f0(6)) == pytest.approx(sum(gemmi.Element("C").c4322.a), rel=1e-12)
    assert float(t.f0(6)) == pytest.approx(2.5088, abs=1e-4)


def test_unknown_element_is_named():
    t = mm.get_table("electron")
    with pytest.raises(mm.UnknownElementError, match="atomic number"):
        t.check_elements(np.array([6, 0, 8]))
    with pytest.raises(mm.UnknownElementError, match="99"):
        t.check_elements(np.array([99]))


def test_atomic_image_of_several_b_equals_adaptive_quadrature():
    from scipy.integrate import quad

    from modelmap.scattering import atomic_image

    d, b_values, r = 2.5, np.array([0.0, 20.0, 80.0]), np.array([0.0, 0.7, 3.1])
    images = atomic_image(8, r, d, b_values)
    assert images.shape == (3, 3)
    coef = gemmi.Element("O").c4322
    for b, row in zip(b_values, images):
        np.testing.assert_allclose(row, atomic_image(8, r, d, float(b)), rtol=1e-13)  # one B at a time

        def f(s, b=b):
            return sum(a * np.exp(-bb * s * s / 4) for a, bb in zip(coef.a, coef.b)) * np.exp(-b * s * s / 4)

        peak = 4 * np.pi * quad(lambda s: s * s * f(s), 0, 1 / d, epsabs=1e-14, epsrel=1e-11)[0]
        assert row[0] == pytest.approx(peak, rel=1e-10)
        for x, got in zip(r[1:], row[1:]):
            ref = 2 / x * quad(lambda s: s * f(s) * np.sin(2 * np.pi * s * x), 0, 1 / d, epsabs=1e-14, epsrel=1e-11)[0]
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-12 * peak)
