"""Vectorisable scalar maths for @njit kernels, in float32 and float64: ``exp``, ``tanh``, ``log1p_unit``
(log(1 + x) on [0, 1]) and ``typed`` (a constant in an argument's float type); and the numba backend's
side of ``kernels/_scalar.py`` (its primitives resolve to these functions, its formulas become
:data:`scalar` functions; ``sigmoid`` is its formula of one argument).

``np.exp``/``np.tanh`` inside @njit compile to scalar libm calls on this machine (no SVML), so a loop
that calls them never vectorises. These functions use only arithmetic, comparisons (which become
selects) and an integer-to-float bit cast, and are inlined into the caller's Numba IR, so LLVM
vectorises the calling loop (checked in tests/test_activations.py with ``inspect_asm``).

Each function is a Numba ``overload``: callable only from compiled code, with its implementation and
typed constants chosen by the argument's type (float32 code for float32 arguments, never promoted).
Inlined code is compiled with the caller's fast-math flags (the project's ``jit``: reassoc, contract,
nsz, arcp), so every step whose rounding order matters is written so those flags cannot change it:
the Cody-Waite reduction and the polynomials are explicit fused multiply-adds (llvm.fma), the scaling
by 2**n adds to exponent bits in integer arithmetic, and divisions are IEEE divisions without the
zero-division check that the default error model would add (it stops a loop from vectorising). NaN and
Inf keep IEEE behaviour as long as the caller's flags exclude nnan/ninf (the project's ``jit`` does).

Accuracy over dense grids incl. the extremes, with the project's flags (tests/test_activations.py):
``exp`` within 1 ulp of the correctly rounded result, ``tanh`` within 2 ulp, ``log1p_unit`` within
2.5 ulp, ``_scalar.sigmoid`` within 3 ulp; exact limits 0, 1, ±1 and inf; NaN propagates.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

from .. import _scalar
from ._jit import FASTMATH

_FLOATS = (types.float32, types.float64)


class _F32:
    """float32 constants. exp: SLEEF's expf minimax polynomial and Cody-Waite split of ln 2;
    tanh: Cephes' tanhf minimax polynomial for |x| < 0.625; log1p_unit: see _F64."""
    float = np.float32
    ln2_hi, ln2_lo = 0.693145751953125, 1.428606765330187045e-06
    # exp(lo) rounds to 0 and exp(hi) to inf through the scaling itself, so clamping x to [lo, hi]
    # keeps every intermediate finite and the float-to-int conversion defined.
    exp_lo, exp_hi = -104.0, 89.0
    exp_poly = (0.5, 0.166666671633720397949219, 0.0416664853692054748535156,
                0.00833336077630519866943359, 0.00139304355252534151077271, 0.000198527617612853646278381)
    tanh_poly = (-3.33332819422e-1, 1.33314422036e-1, -5.37397155531e-2, 2.06390887954e-2,
                 -5.70498872745e-3)
    log1p_poly = (0.33333205234031577, 0.2001089542741974, 0.13999086629214952, 0.14013819784135725)


class _F64:
    """float64 constants. exp: SLEEF's exp minimax polynomial and Cody-Waite split of ln 2;
    tanh: a weighted least-squares fit (50-digit mpmath) of (tanh(x) - x) / x**3 in x**2 on |x| < 0.625;
    log1p_unit: the same kind of fit of (atanh(s) / s - 1) / s**2 in s**2 on s**2 <= 1/9."""
    float = np.float64
    ln2_hi, ln2_lo = 0.69314718055966295651160180568695068359375, 0.28235290563031577122588448175013436025525412068e-12
    exp_lo, exp_hi = -746.0, 710.0
    exp_poly = (0.5, 0.166666666666666851703837, 0.0416666666666665047591422, 0.00833333333331652721664984,
                0.00138888888889774492207962, 0.000198412698960509205564975, 2.4801587159235472998791e-05,
                2.75572362911928827629423e-06, 2.75573911234900471893338e-07, 2.51112930892876518610661e-08,
                2.08860621107283687536341e-09)
    tanh_poly = (-0.3333333333333285, 0.13333333333261532, -0.05396825393114249, 0.021869487574973215,
                 -0.008863221001908643, 0.003591989240119084, -0.001454959463096882, 0.0005863189975412841,
                 -0.00022856992745814506, 7.715145163688556e-05, -1.6076230392177118e-05)
    log1p_poly = (0.3333333333333901, 0.1999999999798926, 0.14285714531850172, 0.11111096336114265,
                  0.090914097441118, 0.07682110136234419, 0.06793465602184258, 0.04950032950276473,
                  0.08872463753112954)


def _same_floats(*args):
    """The common float type of the arguments, or None (the intrinsic then does not apply)."""
    return args[0] if args[0] in _FLOATS and all(a == args[0] for a in args) else None


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma, an FMA instruction here): no flag can reassociate it."""
    t = _same_floats(a, b, c)
    if t is None:
        return None

    def codegen(context, builder, signature, args):
        ft = args[0].type
        fma = builder.module.declare_intrinsic("llvm.fma", [ft], ir.FunctionType(ft, [ft, ft, ft]))
        return builder.call(fma, args)

    return t(t, t, t), codegen


@intrinsic
def _fence(typingctx, a):
    """``a``, through ``llvm.arithmetic.fence``: fast-math flags cannot look into it (nsz would turn an
    ``_fma(x, y, _fence(0))`` into ``x * y``, whose zeros differ in sign and which reassoc then reorders)."""
    t = _same_floats(a)
    if t is None:
        return None

    def codegen(context, builder, signature, args):
        ft = args[0].type
        return builder.call(builder.module.declare_intrinsic("llvm.arithmetic.fence", [ft], ir.FunctionType(ft, [ft])),
                            args)

    return t(t), codegen


@intrinsic
def _div(typingctx, a, b):
    """IEEE a / b with no zero-division check, whatever the caller's error model (the check of the
    default Python error model would keep the calling loop from vectorising)."""
    t = _same_floats(a, b)
    if t is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(*args)

    return t(t, t), codegen


def _exponent_bits(builder, n):
    """The integer-valued float ``n`` shifted into the exponent field of its float type."""
    width, mantissa = (32, 23) if n.type == ir.FloatType() else (64, 52)
    int_t = ir.IntType(width)
    return builder.shl(builder.fptosi(n, int_t), ir.Constant(int_t, mantissa)), int_t


@intrinsic
def _pow2(typingctx, n):
    """2.0**n for a float n holding an integer in the normal exponent range, built from its bits."""
    if n not in _FLOATS:
        return None

    def codegen(context, builder, signature, args):
        bits, int_t = _exponent_bits(builder, args[0])
        one = builder.bitcast(context.get_constant(n, 1.0), int_t)
        return builder.bitcast(builder.add(bits, one), args[0].type)

    return n(n), codegen


@intrinsic
def _ldexp(typingctx, x, n):
    """x * 2.0**n by adding n to x's exponent bits: exact, for x and the result normal numbers. No
    floating-point multiply, so the caller's reassociation cannot fold it into another scaling."""
    t = _same_floats(x, n)
    if t is None:
        return None

    def codegen(context, builder, signature, args):
        bits, int_t = _exponent_bits(builder, args[1])
        return builder.bitcast(builder.add(builder.bitcast(args[0], int_t), bits), args[0].type)

    return t(t, t), codegen


@register_jitable
def _horner(t, coeffs):
    """``coeffs[0] + coeffs[1] t + coeffs[2] t**2 + ...`` by FMAs; unrolled by LLVM (constant tuple)."""
    acc = coeffs[-1]
    for j in range(len(coeffs) - 2, -1, -1):
        acc = _fma(acc, t, coeffs[j])
    return acc


def _exp_impl(c):
    f = c.float
    log2e, minus_ln2_hi, minus_ln2_lo = f(1 / np.log(2)), f(-c.ln2_hi), f(-c.ln2_lo)
    lo, hi, half, one = f(c.exp_lo), f(c.exp_hi), f(0.5), f(1)
    poly = tuple(f(v) for v in c.exp_poly)

    def impl(x):
        xc = x if x >= lo else lo  # also maps NaN to lo (a defined float-to-int conversion); restored below
        xc = xc if xc <= hi else hi
        n = np.floor(xc * log2e + half)  # x = n ln2 + r, |r| <= ln2 / 2
        r = _fma(n, minus_ln2_lo, _fma(n, minus_ln2_hi, xc))
        e = one + _fma(r * r, _horner(r, poly), r)
        n1 = np.floor(n * half)  # e 2**n as (e 2**n1) 2**(n - n1): one rounding, no overflow on the way
        y = _ldexp(e, n1) * _pow2(n - n1)
        return y if x == x else x

    return impl


def _tanh_impl(c):
    f = c.float
    small, zero, one, minus_two = f(0.625), f(0), f(1), f(-2)
    poly = tuple(f(v) for v in c.tanh_poly)

    def impl(x):
        a = abs(x)
        if a < small:  # odd polynomial: no cancellation near 0
            return _fma(x * (x * x), _horner(x * x, poly), x)
        z = exp(minus_two * a)  # in [0, 0.29): 1 - z loses nothing, and z = 0 gives exactly 1
        y = _div(one - z, one + z)
        return y if x >= zero else -y

    return impl


def _log1p_unit_impl(c):
    two = c.float(2)
    poly = tuple(c.float(v) for v in c.log1p_poly)

    def impl(x):
        s = _div(x, two + x)  # log(1 + x) = 2 atanh(s), s in [0, 1/3]: no 1 + x rounding to undo
        t = s * s
        return _fma((two * s) * t, _horner(t, poly), two * s)

    return impl


def _typed(make_impl):
    """The overload body: the implementation for the argument's float type (None: not supported)."""
    impls = {types.float32: make_impl(_F32), types.float64: make_impl(_F64)}
    return lambda x: impls.get(x)


def _compiled_only(name):
    return TypeError(f"kernels.cpu._math.{name} is for @njit code; call it inside a compiled function")


def exp(x):
    """e**x within 1 ulp; exp(x) = inf above the float range, 0 below it, NaN propagates."""
    raise _compiled_only("exp")


def tanh(x):
    """Hyperbolic tangent: an odd polynomial near 0, (1 - e**-2|x|) / (1 + e**-2|x|) beyond; exactly ±1
    at saturation, NaN propagates."""
    raise _compiled_only("tanh")


def log1p_unit(x):
    """log(1 + x) for 0 <= x <= 1 (e.g. x = e**-|y| in a stable softplus), within 2.5 ulp; NaN propagates.
    Outside [0, 1] it is not accurate: it is not a general log1p."""
    raise _compiled_only("log1p_unit")


overload(exp, inline="always")(_typed(_exp_impl))
overload(log1p_unit, inline="always")(_typed(_log1p_unit_impl))
overload(tanh, inline="always")(_typed(_tanh_impl))


def typed(value, like):
    """``value`` converted to the float type of ``like`` (a float or a float array): the typed constant
    a generic function needs (a bare ``1`` or ``1.0`` would promote float32 arithmetic to float64)."""
    raise _compiled_only("typed")


@overload(typed, inline="always")
def _typed_constant(value, like):
    dtype = like.dtype if isinstance(like, types.Array) else like
    cast = {types.float32: np.float32, types.float64: np.float64}.get(dtype)
    if cast is not None:
        return lambda value, like: cast(value)


# Scalar functions, inlined by LLVM into the loops that call them. They are plain Python functions registered
# with Numba rather than dispatchers, so a kernel closing over one stays cacheable (its cache key hashes the
# closure: a function pickles by name, a dispatcher by a per-process id). error_model numpy: divisions are
# IEEE, without the zero check that would keep a loop from vectorising.
scalar = register_jitable(fastmath=set(FASTMATH), error_model="numpy")

# The activation formulas of kernels/_scalar.py are scalar functions, as they were when written here (the
# optimizer updates are inlined into their loops by optim.py); _scalar's primitives resolve to this module.
for _forward, _backward in _scalar.ACTIVATIONS.values():
    scalar(_forward)
    scalar(_backward)


_scalar.implement(overload, {_scalar.exp: exp, _scalar.tanh: tanh, _scalar.sqrt: np.sqrt, _scalar.div: np.true_divide})


def sigmoid(x):
    """``_scalar.sigmoid`` of one argument, for loops outside the elementwise kernels (the GEMM's epilogue)."""
    raise _compiled_only("sigmoid")


overload(sigmoid, inline="always")(lambda x: lambda x: _scalar.sigmoid(x, x, x))
