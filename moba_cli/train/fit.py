"""Scaling-law fits: loss against training compute, ``L(C) = a * C^(-b)`` (``+ e`` where points allow).

With scipy, ``curve_fit`` gives the parameters and their standard errors (from its covariance). Without it,
the pure power law is a least-squares line in log-log space, with the textbook standard errors of the
slope and intercept. The irreducible term ``e`` needs at least 4 points and a well-conditioned fit;
otherwise the pure power law is reported and ``irreducible`` says why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moba_cli.errors import MobaError


def loglog_fit(compute: np.ndarray, loss: np.ndarray) -> dict[str, Any]:
    """``log L = log a - b log C`` by least squares; standard errors need 3+ points (else None)."""
    x, y = np.log(compute), np.log(loss)
    n = len(x)
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    if sxx == 0:
        raise MobaError("every point has the same compute; a fit needs at least two compute values")
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    resid = y - (intercept + slope * x)
    b_err = a_log_err = None
    if n > 2:
        s2 = float((resid**2).sum() / (n - 2))
        b_err = math.sqrt(s2 / sxx)
        a_log_err = math.sqrt(s2 * (1 / n + xm**2 / sxx))
    a = math.exp(intercept)
    return {"a": a, "b": -slope, "e": None, "a_err": a * a_log_err if a_log_err is not None else None,
            "b_err": b_err, "e_err": None, "method": "log-log least squares", "n": n}


def _curve_fit(compute: np.ndarray, loss: np.ndarray, irreducible: bool, start: dict[str, Any]) -> dict[str, Any]:
    from scipy.optimize import curve_fit

    c0 = float(np.exp(np.log(compute).mean()))  # fit in units of the geometric-mean compute: well scaled
    x = compute / c0
    a0 = start["a"] * c0 ** (-start["b"])
    if irreducible:
        e0 = 0.5 * float(loss.min())
        p0 = [max(a0 - e0, 1e-6), start["b"], e0]

        def f(x, a, b, e):
            return a * np.power(x, -b) + e

        bounds = ([0, 0, 0], [np.inf, 10, float(loss.min())])
    else:
        p0 = [a0, start["b"]]

        def f(x, a, b):
            return a * np.power(x, -b)

        bounds = ([0, -10], [np.inf, 10])
    popt, pcov = curve_fit(f, x, loss, p0=p0, bounds=bounds, maxfev=20000)
    errs = np.sqrt(np.diag(pcov))
    if not np.all(np.isfinite(errs)):
        raise RuntimeError("covariance not finite")
    a, b = float(popt[0]), float(popt[1])
    # Back to raw compute: a * (C / c0)^-b = (a * c0^b) * C^-b.
    scale = c0**b
    out = {"a": a * scale, "b": b, "a_err": float(errs[0]) * scale, "b_err": float(errs[1]),
           "e": float(popt[2]) if irreducible else None, "e_err": float(errs[2]) if irreducible else None,
           "method": "scipy curve_fit", "n": len(x)}
    return out


def fit_power_law(compute: Any, loss: Any, irreducible: bool | None = None) -> dict[str, Any]:
    """Fit ``L(C)``. ``irreducible``: None tries ``+ e`` when there are 4+ points; True insists; False never.

    Returns ``{a, b, e, a_err, b_err, e_err, method, n, rmse, irreducible}`` (errors None where unknown).
    """
    c = np.asarray(compute, dtype=np.float64)
    ls = np.asarray(loss, dtype=np.float64)
    if c.shape != ls.shape or c.ndim != 1 or len(c) < 2:
        raise MobaError("a scaling fit needs at least two (compute, loss) points")
    if (c <= 0).any() or (ls <= 0).any() or not (np.isfinite(c).all() and np.isfinite(ls).all()):
        raise MobaError("scaling fit points must be positive and finite")
    start = loglog_fit(c, ls)
    result, note = start, "not tried"
    try:
        import scipy  # noqa: F401
    except ImportError:
        have_scipy = False
        note = "needs scipy"
    else:
        have_scipy = True
        try:
            result = _curve_fit(c, ls, False, start)
        except (RuntimeError, ValueError):
            result = start
    want = irreducible if irreducible is not None else len(c) >= 4
    if want and have_scipy:
        if len(c) < 4:
            note = "needs 4+ points"
        else:
            try:
                result, note = _curve_fit(c, ls, True, start), "fitted"
            except (RuntimeError, ValueError) as e:
                note = f"fit failed ({e})"
    elif not want:
        note = "not requested" if irreducible is False else "needs 4+ points"
    pred = predict(result, c)
    result["rmse"] = float(np.sqrt(np.mean((pred - ls) ** 2)))
    result["irreducible"] = note
    return result


def predict(fit: dict[str, Any], compute: Any) -> np.ndarray:
    c = np.asarray(compute, dtype=np.float64)
    return fit["a"] * np.power(c, -fit["b"]) + (fit["e"] or 0.0)
