"""Vectorizable exp, sigmoid and tanh as TIR expressions, for kernels we write by hand.

LLVM turns `T.exp` / `T.sigmoid` / `T.tanh` into scalar libm calls even inside a vectorized loop;
these are polynomials it vectorizes. `fast_exp` is the Cephes-style range reduction and degree-6
polynomial that TVM's own `topi.fast_exp` uses (relative error <= 4e-7 in our measurements);
inputs are clamped to +-88.376 (exp overflows float32 beyond).
"""
from __future__ import annotations

from tvm import tirx

_EXP_COEFFICIENTS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                     5.0000001201e-1)


def fast_exp(x, dtype: str = "float32"):
    """exp(x) for float32 `x` (a PrimExpr or buffer load)."""
    if dtype != "float32":
        raise ValueError(f"fast_exp is written for float32, not {dtype}")
    const = lambda v: tirx.const(v, dtype)  # noqa: E731
    x = tirx.max(tirx.min(x, const(88.3762626647950)), const(-88.3762626647949))
    n = tirx.floor(x * const(1.44269504088896341) + const(0.5))  # x = n ln2 + f, |f| <= ln2 / 2
    f = x - n * const(0.6931471805599453)
    y = const(_EXP_COEFFICIENTS[0])
    for coefficient in _EXP_COEFFICIENTS[1:]:
        y = y * f + const(coefficient)
    y = y * f * f + f + const(1.0)
    two_to_n = tirx.reinterpret(dtype, tirx.shift_left(tirx.Cast("int32", n + const(127.0)), tirx.const(23, "int32")))
    return two_to_n * y


def fast_sigmoid(x, dtype: str = "float32"):
    """1 / (1 + exp(-x))."""
    one = tirx.const(1.0, dtype)
    return one / (one + fast_exp(tirx.const(0.0, dtype) - x, dtype))


def fast_tanh(x, dtype: str = "float32"):
    """1 - 2 / (exp(2x) + 1): saturates to +-1 (absolute error ~1e-7 near 0)."""
    one = tirx.const(1.0, dtype)
    return one - tirx.const(2.0, dtype) / (fast_exp(x + x, dtype) + one)
