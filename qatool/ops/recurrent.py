"""Recurrent layers: LSTM, GRU and RNN, forward and backward, computing what onnxruntime's CPU kernels compute.

All three share one frame (`_Recurrent`): the input projection X @ W^T of every time step and direction is one
matrix product before the time loop, bias included; the loop does only H_{t-1} @ R^T and the gate arithmetic,
both directions of a bidirectional layer at once (arrays are laid out direction-first, (D, S, B, ...), in each
direction's processing order). Backward turns the saved gate activations into per-step multipliers with a few
whole-sequence passes, so its loop is a handful of small products and one dG @ R per step; dW, dR, dX and dB are
then one product (or sum) each over all steps.

Semantics, checked against onnxruntime 1.32's CPU kernels (where onnxruntime and the ONNX text differ, the
engine does what onnxruntime does: that is what runs the deployed model):
- `sequence_lens`: a sequence of length L uses steps 0..L-1 (the reverse direction runs L-1 down to 0); Y is 0
  from step L on; Y_h / Y_c are the state after the last valid step, and 0 for a length of 0 (not the initial
  state).
- `clip` bounds the input of every gate activation (bias and peepholes included), not the cell state that
  LSTM's h() reads; its gradient is the mask |x| <= clip.
- `activation_alpha` / `activation_beta`: LSTM and GRU hand them out in order to the activations that take them
  (Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu), defaulting to LeakyRelu 0.01,
  HardSigmoid 0.2 / 0.5, Elu 1.0 and 0 for the others (Affine, ScaledTanh, ThresholdedRelu: not the ONNX ops'
  defaults). Names are case-insensitive for LSTM / GRU, exact for RNN.
- `input_forget` (LSTM): f = 1 - i (the forget peephole is unused). `linear_before_reset` (GRU) both ways.
- `layout` 1 (batch first) is computed here; onnxruntime's three kernels refuse it.

`qatool.DynamicQuantizeLSTM` is the LSTM as onnxruntime's int8 DynamicQuantizeLSTM computes it (its input and
hidden state quantized to uint8 inside the kernel, int8 weights), bit for bit: the form `recurrent: dynamic`
trains and exports (see its docstring).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import ModelError
from . import mlas
from .base import Op, register

# onnxruntime's table: which activations take alpha / beta, and their defaults (0 where not listed)
_TAKES = {"affine": (True, True), "relu": (False, False), "leakyrelu": (True, False),
          "thresholdedrelu": (True, False), "tanh": (False, False), "scaledtanh": (True, True),
          "sigmoid": (False, False), "hardsigmoid": (True, True), "elu": (True, False),
          "softsign": (False, False), "softplus": (False, False)}
_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}
_CANONICAL = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
              "Elu", "Softsign", "Softplus"]


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _Act:
    """One gate activation: `act(x, out)` writes f(x) into out (out may be x); `slope(y, x)` is f'(x) as a new
    array, from the output y, and from the input x only where y does not determine it (`needs_x`). With `mlas`,
    sigmoid and tanh are onnxruntime's own approximations, bit for bit (`mlas.logistic`, `mlas.tanh`)."""

    def __init__(self, name: str, alpha: float = 0.0, beta: float = 0.0, mlas: bool = False):
        self.name, self.alpha, self.beta = name, float(alpha), float(beta)
        self.mlas = mlas and name in ("sigmoid", "tanh")
        a = self.alpha
        self.needs_x = (name in ("leakyrelu", "elu") and a <= 0) or (name == "thresholdedrelu" and a < 0)

    def key(self):
        return self.name, self.alpha, self.beta

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        t, n, a, b = x.dtype.type, self.name, self.alpha, self.beta
        if self.mlas:
            np.copyto(out, mlas.logistic(x) if n == "sigmoid" else mlas.tanh(x))
        elif n == "sigmoid":  # 0.5 tanh(x/2) + 0.5: no overflow, and faster than 1 / (1 + exp(-x))
            np.multiply(x, t(0.5), out=out)
            np.tanh(out, out=out)
            np.multiply(out, t(0.5), out=out)
            np.add(out, t(0.5), out=out)
        elif n == "tanh":
            np.tanh(x, out=out)
        elif n == "relu":
            np.clip(x, t(0), t(np.inf), out=out)
        elif n == "affine":
            np.multiply(x, t(a), out=out)
            np.add(out, t(b), out=out)
        elif n == "leakyrelu":
            neg = x < 0
            if out is not x:
                np.copyto(out, x)
            np.multiply(out, t(a), out=out, where=neg)
        elif n == "thresholdedrelu":
            np.multiply(x, x > t(a), out=out)
        elif n == "scaledtanh":
            np.multiply(x, t(b), out=out)
            np.tanh(out, out=out)
            np.multiply(out, t(a), out=out)
        elif n == "hardsigmoid":
            np.multiply(x, t(a), out=out)
            np.add(out, t(b), out=out)
            np.clip(out, t(0), t(1), out=out)
        elif n == "elu":
            neg = x < 0
            if out is not x:
                np.copyto(out, x)
            np.expm1(out, out=out, where=neg)
            np.multiply(out, t(a), out=out, where=neg)
        elif n == "softsign":
            d = np.abs(x)
            d += t(1)
            np.divide(x, d, out=out)
        else:  # softplus: log(1 + e^x)
            np.logaddexp(x, t(0), out=out)
        return out

    def slope(self, y: np.ndarray, x: np.ndarray | None) -> np.ndarray:
        t, n, a, b = y.dtype.type, self.name, self.alpha, self.beta
        if n == "sigmoid":
            return y * (t(1) - y)
        if n == "tanh":
            s = y * y
            return np.subtract(t(1), s, out=s)
        if n == "relu":
            return (y > 0).astype(y.dtype)
        if n == "affine":
            return np.full_like(y, t(a))
        if n == "leakyrelu":
            pos = (x if self.needs_x else y) >= 0
            return np.where(pos, t(1), t(a)).astype(y.dtype, copy=False)
        if n == "thresholdedrelu":
            return ((x > t(a)) if self.needs_x else (y != 0)).astype(y.dtype)
        if n == "scaledtanh":
            if a == 0:
                return np.zeros_like(y)
            s = y * t(1 / a)
            s *= s
            np.subtract(t(1), s, out=s)
            return np.multiply(s, t(a * b), out=s)
        if n == "hardsigmoid":
            return ((y > 0) & (y < 1)).astype(y.dtype) * t(a)
        if n == "elu":
            if self.needs_x:
                return np.where(x >= 0, t(1), np.exp(np.minimum(x, t(0))) * t(a)).astype(y.dtype, copy=False)
            return np.where(y >= 0, t(1), y + t(a)).astype(y.dtype, copy=False)
        if n == "softsign":
            s = t(1) - np.abs(y)
            return np.multiply(s, s, out=s)
        s = np.expm1(-y)  # softplus: f' = sigmoid(x) = 1 - e^{-y}
        return np.negative(s, out=s)


class _Recurrent(Op):
    """The frame LSTM, GRU and RNN share: attributes, input projection, ordering, outputs, weight gradients.

    Processing order: direction d's step s reads time step `_order` maps it to (the identity forward; s -> S-1-s in
    reverse, or L-1-s within each sequence of length L when `sequence_lens` is given: a permutation that is its
    own inverse, so the same map takes outputs back to time order).
    """

    n_gates: ClassVar[int] = 1
    n_acts: ClassVar[int] = 1
    default_acts: ClassVar[tuple[str, ...]] = ()
    mlas_activations: ClassVar[bool] = False  # sigmoid and tanh as onnxruntime's approximations (`_Act`)
    attrs = {"activation_alpha": None, "activation_beta": None, "activations": None, "clip": None,
             "direction": "forward", "hidden_size": None, "layout": 0}

    def __init__(self, node, opset: int = 13):
        super().__init__(node, opset)
        for key in node.attrs:
            if key not in self.attrs:
                self._fail(f"attribute {key!r} is not supported (known: {', '.join(sorted(self.attrs))})")
        direction = _text(self.direction)
        if direction not in ("forward", "reverse", "bidirectional"):
            self._fail(f"direction {direction!r} is not supported (forward, reverse or bidirectional)")
        self.num_directions = 2 if direction == "bidirectional" else 1
        self.reversed = [False, True] if direction == "bidirectional" else [direction == "reverse"]
        if self.layout not in (0, 1):
            self._fail(f"layout {self.layout!r} is not supported (0 or 1)")
        if self.clip is not None and not float(self.clip) > 0:
            self._fail(f"clip {self.clip!r} is not supported (a positive threshold)")
        self.clip = None if self.clip is None else float(self.clip)
        if self.hidden_size is not None and int(self.hidden_size) <= 0:
            self._fail(f"hidden_size {self.hidden_size!r} is not supported (a positive integer)")
        self.acts = self._parse_activations()
        first = [a.key() for a in self.acts[0]]
        if all([a.key() for a in acts] == first for acts in self.acts):
            self.groups = [(slice(None), self.acts[0])]  # every direction alike: one call covers them all
        else:
            self.groups = [(slice(d, d + 1), acts) for d, acts in enumerate(self.acts)]
        self.needs_x = any(a.needs_x for acts in self.acts for a in acts)

    def _fail(self, what: str):
        raise ModelError(f"{self.op_type} node {self.node.name!r}: {what}.")

    def _names(self) -> list[str]:
        return [_text(n) for n in (self.activations or [])] or list(self.default_acts) * self.num_directions

    def _parse_activations(self) -> list[tuple[_Act, ...]]:
        """onnxruntime's reading: n_acts names per direction; the alphas and betas go in order to the activations
        that take them, the defaults filling in when they run out."""
        d, k = self.num_directions, self.n_acts
        names = self._names()
        if len(names) != k * d:
            self._fail(f"activations has {len(names)} entries where direction {_text(self.direction)!r} needs {k * d}")
        alphas, betas = list(self.activation_alpha or []), list(self.activation_beta or [])
        acts = []
        for name in names:
            low = name.lower()
            if low not in _TAKES:
                self._fail(f"activation {name!r} is not supported (one of {', '.join(_CANONICAL)})")
            takes_a, takes_b = _TAKES[low]
            da, db = _DEFAULTS.get(low, (0.0, 0.0))
            a = (alphas.pop(0) if alphas else da) if takes_a else 0.0
            b = (betas.pop(0) if betas else db) if takes_b else 0.0
            acts.append(_Act(low, a, b, self.mlas_activations))
        return [tuple(acts[i * k:(i + 1) * k]) for i in range(d)]

    # ---- shapes and order -----------------------------------------------------------------------------------
    def _need(self, i: int) -> bool:
        return i < len(self.needs_grad) and self.needs_grad[i]

    def _setup(self, x, w, r, b, lens):
        """Check the shapes; set S, B, I, H, D and the processing order; return x as (S, B, I)."""
        if x.ndim != 3:
            self._fail(f"X has shape {x.shape}, not 3-D")
        xt = x.transpose(1, 0, 2) if self.layout else x
        S, B, I = xt.shape
        D, G = self.num_directions, self.n_gates
        H = int(self.hidden_size) if self.hidden_size is not None else r.shape[-1]
        for name, v, shape in (("W", w, (D, G * H, I)), ("R", r, (D, G * H, H)), ("B", b, (D, 2 * G * H))):
            if v is not None and v.shape != shape:
                self._fail(f"input {name} has shape {v.shape}, expected {shape}")
        self.S, self.B, self.I, self.H, self.D = S, B, I, H, D
        self.lens = self.valid = self.tidx = None
        self.invalid = [None] * S
        if lens is not None:
            lens = np.asarray(lens).astype(np.int64).reshape(-1)
            if lens.shape != (B,) or (lens < 0).any() or (lens > S).any():
                self._fail(f"sequence_lens {lens.tolist()} must hold {B} lengths in 0..{S}")
            if (lens < S).any():
                self.lens = lens
                steps = np.arange(S)[:, None]
                self.valid = steps < lens[None, :]  # (S, B), the same in time and in processing order
                self.tidx = np.where(self.valid, lens[None, :] - 1 - steps, steps)
                self.bidx = np.arange(B)[None, :]
                self.invalid = [np.flatnonzero(~v) if not v.all() else None for v in self.valid]
        return xt

    def _order(self, a: np.ndarray, d: int) -> np.ndarray:
        """(S, B, ...) from time order to direction d's processing order, or back (a view or a new array)."""
        if not self.reversed[d]:
            return a
        if self.lens is None:
            return a[::-1]
        return a[self.tidx, self.bidx]

    def _project(self, xt, w, b, dtype) -> np.ndarray:
        """G[d, s] = X(step s of direction d) @ W[d]^T + bias: every step of every direction, before the loop."""
        S, B, I, D = self.S, self.B, self.I, self.D
        GH = self.n_gates * self.H
        G = np.empty((D, S, B, GH), dtype)
        for d in range(D):
            xd = np.ascontiguousarray(self._order(xt, d)).reshape(S * B, I)
            np.matmul(xd, w[d].T, out=G[d].reshape(S * B, GH))
        bias = self._bias(b)
        if bias is not None:
            G += bias[:, None, None, :]
        return G

    def _bias(self, b):
        GH = self.n_gates * self.H
        return None if b is None else b[:, :GH] + b[:, GH:]

    def _state(self, v, dtype) -> np.ndarray:
        """An initial state as (D, B, H) in dtype (zeros when absent)."""
        shape = (self.D, self.B, self.H)
        if v is None:
            return np.zeros(shape, dtype)
        if (v.transpose(1, 0, 2) if self.layout else v).shape != shape:
            want = (shape[1], shape[0], shape[2]) if self.layout else shape
            self._fail(f"an initial state has shape {v.shape}, expected {want}")
        return v.transpose(1, 0, 2) if self.layout else v

    def _mask_rows(self, dst, src, s):
        """Rows past their sequence's end at step s keep the previous state."""
        inv = self.invalid[s]
        if inv is not None:
            dst[:, inv] = src[:, inv]

    def _outputs(self, Hs, finals):
        """(Y, Y_h[, Y_c]) for the node's outputs (None where the node leaves one out) from the states Hs
        (D, S+1, B, H) in processing order and the final states (each (D, B, H))."""
        n = len(self.node.outputs)
        S, B, H, D = self.S, self.B, self.H, self.D
        y = None
        if n > 0 and self.node.outputs[0]:
            y = np.empty((B, S, D, H) if self.layout else (S, D, B, H), Hs.dtype)
            for d in range(D):
                hd = self._order(Hs[d, 1:], d)
                if self.layout:
                    y[:, :, d] = hd.transpose(1, 0, 2)
                else:
                    y[:, d] = hd
            if self.valid is not None:
                m = self.valid.astype(Hs.dtype)
                y *= m.T[:, :, None, None] if self.layout else m[:, None, :, None]
        outs = [y]
        for k, f in enumerate(finals, start=1):
            if k >= n or not self.node.outputs[k]:
                outs.append(None)
                continue
            f = np.array(f)
            if self.lens is not None:
                f[:, self.lens == 0] = 0
            outs.append(np.ascontiguousarray(f.transpose(1, 0, 2)) if self.layout else f)
        return tuple(outs[:max(n, 1)])

    # ---- gradients shared by the three ------------------------------------------------------------------
    def _grad_in(self, gy, finals):
        """The output gradients in processing order: dY as (D, S, B, H) (zero past each sequence's end) or None,
        and the final-state gradients as new (D, B, H) arrays (zeros where absent)."""
        S, B, H, D = self.S, self.B, self.H, self.D
        dyp = None
        if gy is not None:
            dyp = np.empty((D, S, B, H), gy.dtype)
            for d in range(D):
                gd = gy[:, :, d].transpose(1, 0, 2) if self.layout else gy[:, d]
                dyp[d] = self._order(gd, d)
            if self.valid is not None:
                dyp *= self.valid.astype(gy.dtype)[None, :, :, None]
        out = []
        for g in finals:
            if g is None:
                out.append(np.zeros((D, B, H), self.dtype))
                continue
            g = np.array(g.transpose(1, 0, 2) if self.layout else g)
            if self.lens is not None:
                g[:, self.lens == 0] = 0
            out.append(g)
        return dyp, out

    def _valid_f(self, dtype):
        """(1, S, B, 1) validity as numbers, or None without sequence_lens."""
        return None if self.valid is None else self.valid.astype(dtype)[None, :, :, None]

    def _slope(self, k, y, x=None):
        """f_k'(.) over all directions (each direction's own activation)."""
        if len(self.groups) == 1:
            return self.groups[0][1][k].slope(y, x)
        out = np.empty_like(y)
        for dsl, acts in self.groups:
            out[dsl] = acts[k].slope(y[dsl], None if x is None else x[dsl])
        return out

    def _activate(self, k, G, s, cols, mask, pre):
        """Gate block G[:, s, :, cols] in place: clip (its mask kept), keep the input if needed, activation k."""
        x = G[:, s, :, cols]
        if self.clip is not None:
            c = x.dtype.type(self.clip)
            if mask is not None:
                np.less_equal(np.abs(x), c, out=mask[:, s, :, cols])
            np.clip(x, -c, c, out=x)
        if pre is not None:
            pre[:, s, :, cols] = x
        for dsl, acts in self.groups:
            xs = x[dsl]
            acts[k](xs, xs)

    def _apply(self, k, x, out):
        for dsl, acts in self.groups:
            acts[k](x[dsl], out[dsl])
        return out

    def _gate_slope(self, k, y, cols):
        """d activation / d gate input over the whole sequence for gate block `cols`, clip mask included."""
        x = None if self.pre is None else self.pre[..., cols]
        s = self._slope(k, y, x)
        if self.mask is not None:
            s *= self.mask[..., cols]
        return s

    def _flat(self, a):
        """(D, S, B, k) -> (D, S*B, k), a view where `a` allows one."""
        return a.reshape(self.D, self.S * self.B, a.shape[-1])

    def _grad_xw(self, x, w, dG):
        """dX and dW from the gate pre-activation gradients dG (D, S, B, G*H) of all steps: one product each per
        direction."""
        S, B, I, D = self.S, self.B, self.I, self.D
        flat = self._flat(dG)
        gx = gw = None
        if self._need(0):
            gxt = None
            for d in range(D):
                part = self._order((flat[d] @ w[d]).reshape(S, B, I), d)
                gxt = part if gxt is None else gxt + part
            gx = np.ascontiguousarray(gxt.transpose(1, 0, 2) if self.layout else gxt)
        if self._need(1):
            xt = x.transpose(1, 0, 2) if self.layout else x
            gw = np.empty_like(w)
            for d in range(D):
                xd = np.ascontiguousarray(self._order(xt, d)).reshape(S * B, I)
                np.matmul(flat[d].T, xd, out=gw[d])
        return gx, gw

    def _outer(self, flat_g, flat_v, out):
        """out[d] = flat_g[d]^T @ flat_v[d]: a weight gradient summed over all steps and batch rows."""
        for d in range(self.D):
            np.matmul(flat_g[d].T, flat_v[d], out=out[d])
        return out

    def _grads_shared(self, dG, Hs):
        """dX, dW, dR, dB where W and R see the same gate gradients (LSTM, RNN)."""
        gx, gw = self._grad_xw(self.x, self.w, dG)
        flat = self._flat(dG)
        gr = self._outer(flat, self._flat(Hs[:, :self.S]), np.empty_like(self.r)) if self._need(2) else None
        gb = None
        if self._need(3) and self.b is not None:
            wb = flat.sum(axis=1)
            gb = np.concatenate([wb, wb], axis=1)
        return gx, gw, gr, gb

    def _state_grad(self, g):
        return np.ascontiguousarray(g.transpose(1, 0, 2)) if self.layout else g


@register("LSTM")
class LSTM(_Recurrent):
    """i = f(Xi W_i + H R_i + P_i C_prev + b_i), f = f(... + P_f C_prev) (or 1 - i with input_forget),
    c = g(...), C = f C_prev + i c, o = f(... + P_o C), H = o h(C). Gate order in W, R, B: i, o, f, c; in P: i, o, f.

    The bias is added after the recurrent product (and a gate's peephole term), as onnxruntime adds it.
    Saved for backward: the gate activations of every step, the cell and hidden states (processing order)."""

    n_gates, n_acts = 4, 3
    default_acts = ("Sigmoid", "Tanh", "Tanh")
    attrs = {**_Recurrent.attrs, "input_forget": 0}

    def forward(self, ctx, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
        dtype = self.dtype = x.dtype
        xt = self._setup(x, w, r, b, seq_lens)
        S, B, H, D = self.S, self.B, self.H, self.D
        if p is not None and p.shape != (D, 3 * H):
            self._fail(f"input P has shape {p.shape}, expected {(D, 3 * H)}")
        fgt = bool(self.input_forget)
        G = self._project(xt, w, None, dtype)
        bias = self._bias(b)
        bias = None if bias is None else bias[:, None, :]
        grad = ctx.grad
        self.mask = np.empty(G.shape, bool) if grad and self.clip is not None else None
        self.pre = np.empty_like(G) if grad and self.needs_x else None
        Hs = np.empty((D, S + 1, B, H), dtype)
        Cs = np.empty((D, S + 1, B, H), dtype)
        Hs[:, 0] = self._state(h0, dtype)
        Cs[:, 0] = self._state(c0, dtype)
        RT = self._recurrent_weights(r)
        if p is not None:
            pi, po, pf = (p[:, None, k * H:(k + 1) * H] for k in range(3))
        tmp4 = np.empty((D, B, 4 * H), dtype)
        tmp = np.empty((D, B, H), dtype)
        gi, go, gf, gc, gif = (slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H), slice(3 * H, 4 * H),
                               slice(0, 3 * H))
        one = dtype.type(1)
        for s in range(S):
            g = G[:, s]
            hp, cp, c = Hs[:, s], Cs[:, s], Cs[:, s + 1]
            self._recur(hp, RT, tmp4, s)
            g += tmp4
            if p is None:
                _add_bias(g, bias, slice(None))
                self._activate(0, G, s, gif, self.mask, self.pre)  # i, o, f together
            else:
                _add_bias(g, bias, gc)
                g[:, :, gi] += pi * cp
                _add_bias(g, bias, gi)
                self._activate(0, G, s, gi, self.mask, self.pre)
                if not fgt:
                    g[:, :, gf] += pf * cp
                    _add_bias(g, bias, gf)
                    self._activate(0, G, s, gf, self.mask, self.pre)
            self._activate(1, G, s, gc, self.mask, self.pre)
            if fgt:
                np.subtract(one, g[:, :, gi], out=g[:, :, gf])
            np.multiply(g[:, :, gf], cp, out=c)
            np.multiply(g[:, :, gi], g[:, :, gc], out=tmp)
            c += tmp
            if p is not None:
                g[:, :, go] += po * c
                _add_bias(g, bias, go)
                self._activate(0, G, s, go, self.mask, self.pre)
            self._apply(2, c, tmp)
            np.multiply(g[:, :, go], tmp, out=Hs[:, s + 1])
            if self.invalid[s] is not None:
                self._mask_rows(Hs[:, s + 1], hp, s)
                self._mask_rows(c, cp, s)
        if grad:
            self.x, self.w, self.r, self.p, self.b = x, w, r, p, b
            self.G, self.Hs, self.Cs = G, Hs, Cs
        return self._outputs(Hs, (Hs[:, S], Cs[:, S]))

    def _recurrent_weights(self, r):
        """R as the loop multiplies it, (D, H, 4H)."""
        return np.ascontiguousarray(r.transpose(0, 2, 1))

    def _recur(self, hp, RT, out, s):
        """out = H_{t-1} R^T at processing step s, for every direction."""
        np.matmul(hp, RT, out=out)

    def backward(self, gy=None, gyh=None, gyc=None):
        S, B, H, D = self.S, self.B, self.H, self.D
        G, Hs, Cs, p = self.G, self.Hs, self.Cs, self.p
        dtype = G.dtype
        one = dtype.type(1)
        dyp, (dh, dc) = self._grad_in(gy, (gyh, gyc))
        fgt = bool(self.input_forget)
        gi, go, gf, gc = (slice(k * H, (k + 1) * H) for k in range(4))
        i, o, f, c = G[..., gi], G[..., go], G[..., gf], G[..., gc]
        cprev, cell = Cs[:, :S], Cs[:, 1:]
        # per-step multipliers, over the whole sequence at once
        hc = self._apply(2, cell, np.empty_like(cell))
        a_o = hc * self._gate_slope(0, o, go)                  # dpre_o = dH_s * a_o
        a_c = o * self._slope(2, hc, cell)                     # dC_s = dC + dH_s * a_c
        if p is not None:
            a_c += a_o * p[:, None, None, H:2 * H]
        a4 = np.zeros((D, S, B, 4, H), dtype)                  # dpre_{i,f,c} = dC_s * a4 (slot o set per step)
        si = self._gate_slope(0, i, gi)
        if fgt:
            np.multiply(c - cprev, si, out=a4[..., 0, :])
        else:
            np.multiply(c, si, out=a4[..., 0, :])
            np.multiply(cprev, self._gate_slope(0, f, gf), out=a4[..., 2, :])
        np.multiply(i, self._gate_slope(1, c, gc), out=a4[..., 3, :])
        a_cp = np.array(f)                                     # dC_prev = dC_s * a_cp
        if p is not None:
            a_cp += a4[..., 0, :] * p[:, None, None, 0:H]
            if not fgt:
                a_cp += a4[..., 2, :] * p[:, None, None, 2 * H:3 * H]
        v = self._valid_f(dtype)
        if v is not None:
            a_o *= v
            a_c *= v
            a4 *= v[..., None]
            a_cp *= v
            a_cp += one - v
        del hc, si
        dG = np.empty((D, S, B, 4 * H), dtype)
        dG4 = dG.reshape(D, S, B, 4, H)
        r = self.r
        dhs = np.empty((D, B, H), dtype)
        dcs = np.empty((D, B, H), dtype)
        for s in range(S - 1, -1, -1):
            if dyp is not None:
                np.add(dh, dyp[:, s], out=dhs)
            else:
                dhs[...] = dh
            np.multiply(dhs, a_c[:, s], out=dcs)
            dcs += dc
            np.multiply(a4[:, s], dcs[:, :, None, :], out=dG4[:, s])
            np.multiply(dhs, a_o[:, s], out=dG4[:, s, :, 1])
            np.multiply(dcs, a_cp[:, s], out=dc)
            dh = np.matmul(dG[:, s], r)
            self._mask_rows(dh, dhs, s)
        gx, gw, gr, gb = self._grads_shared(dG, Hs)
        gh0 = self._state_grad(dh) if self._need(5) else None
        gc0 = self._state_grad(dc) if self._need(6) else None
        gp = None
        if p is not None and self._need(7):
            gp = np.zeros_like(p)
            gp[:, 0:H] = np.einsum("dsbh,dsbh->dh", dG[..., gi], cprev)
            gp[:, H:2 * H] = np.einsum("dsbh,dsbh->dh", dG[..., go], cell)
            if not fgt:
                gp[:, 2 * H:] = np.einsum("dsbh,dsbh->dh", dG[..., gf], cprev)
        return gx, gw, gr, gb, None, gh0, gc0, gp


@register("qatool.DynamicQuantizeLSTM")
class DynamicQuantizeLSTM(LSTM):
    """An LSTM as onnxruntime's DynamicQuantizeLSTM (com.microsoft) computes it, each input sequence on its own:
    the int8 form of an ONNX LSTM that qatool exports with `recurrent: dynamic` (`quant.prepare`).

    Inputs: the LSTM's eight, then W_scale and R_scale, [D, 4H] (per direction and gate row) or [D]. W and R arrive
    fake-quantized (WeightQuant: symmetric, zero point 0): their integers are W / W_scale and R / R_scale.

    What onnxruntime 1.32's kernel computes (contrib_ops/cpu/quantization/dynamic_quantize_lstm.cc ->
    LSTMBase::ComputeImpl -> UniDirectionalLstm, the quantized ComputeGemm of rnn_helpers.cc; MLAS on x86-64),
    for a batch of one sequence of length L:
    - the input projection: X[:L] is quantized once, uint8 asymmetric over all its L x I values, the range
      stretched to contain 0 (`mlas.dynamic_qparams`, round half to even); the same integers serve both
      directions; XW[n] = float32(acc) * float32(s_x * s_w[n]), acc = sum_k (x_q - z_x) w_q[k, n] exact in int32;
    - at every step, h_{t-1} (its H values) is quantized the same way, and the gates' pre-activations become
      XW + float32(acc_h) * float32(s_h * s_r[n]) (a multiply, then an add);
    - then the float LSTM: the peephole terms, + (Wb + Rb), clip, sigmoid and tanh by MLAS's approximations
      (`mlas.logistic`, `mlas.tanh`), c = c_prev f + i g, h = o tanh(c).
    This op computes exactly that, bit for bit (tests/test_dynamic_lstm.py), for every sequence of a batch
    separately. onnxruntime given a batch of N sequences quantizes X over all N (the steps below the longest
    length) and h_{t-1} over all N rows, or with several threads and N > 4 (N >= 2 when H <= 256) over chunks of
    ceil(N / threads) rows: its results then depend on the batch and the thread count, so the int8 model is
    checked and measured one input at a time (`ir.batch.PER_INPUT_KEY`).

    Backward: straight-through. The gradients are the float LSTM's with the dequantized values the products
    read in place of x and h_{t-1} (for dW and dR); d(x quantized)/dx = 1 (a dynamic range covers every value it
    quantizes) and the ranges themselves get no gradient. Saved on top of the LSTM's: nothing (the dequantized x
    and states replace x and the states).
    """

    mlas_activations = True

    def forward(self, ctx, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None, w_scale=None, r_scale=None):
        if self.layout:
            self._fail("layout 1 is not supported (onnxruntime's DynamicQuantizeLSTM runs layout 0)")
        if w_scale is None or r_scale is None:
            self._fail("W_scale and R_scale (inputs 8 and 9) are required")
        d = w.shape[0]
        self.keep = ctx.grad
        self.w_scale = np.asarray(w_scale, x.dtype).reshape(d, -1)  # (D, 4H) or (D, 1)
        self.r_scale = np.asarray(r_scale, x.dtype).reshape(d, -1)
        out = super().forward(ctx, x, w, r, b, seq_lens, h0, c0, p)
        if ctx.grad:  # what the weight products read, for dW and dR
            self.x, self.Hs = self.x_hat, self.h_hat
        return out

    def backward(self, gy=None, gyh=None, gyc=None):
        return (*super().backward(gy, gyh, gyc), None, None)

    def _project(self, xt, w, b, dtype):
        """XW of every step and direction (b is None: the LSTM adds its bias later)."""
        S, B, I, D = self.S, self.B, self.I, self.D
        GH = 4 * self.H
        inside = xt if self.valid is None else np.where(self.valid[:, :, None], xt, 0)  # steps past the end: 0
        scale, zero = mlas.dynamic_qparams(inside, axis=(0, 2))  # (1, B, 1): one range per sequence
        codes = mlas.dynamic_codes(xt, scale, zero)
        self.x_hat = codes * scale if self.keep else None
        w_codes = np.rint(w / self.w_scale[:, :, None])
        bound = mlas.UINT8_LEVELS * float(np.abs(w_codes).max(initial=0))
        multiplier = scale[0] * self.w_scale[:, None, :]  # (D, B, 4H)
        G = np.empty((D, S, B, GH), dtype)
        for d in range(D):
            xd = np.ascontiguousarray(self._order(codes, d)).reshape(S * B, I)
            acc = mlas.integer_product(xd, w_codes[d].T, bound).reshape(S, B, GH)
            np.multiply(acc, multiplier[d], out=G[d])
        return G

    def _recurrent_weights(self, r):
        codes = np.rint(r / self.r_scale[:, :, None])
        self.r_bound = mlas.UINT8_LEVELS * float(np.abs(codes).max(initial=0))
        self.h_hat = np.empty((self.D, self.S, self.B, self.H), r.dtype) if self.keep else None
        return np.ascontiguousarray(codes.transpose(0, 2, 1))

    def _recur(self, hp, RT, out, s):
        scale, zero = mlas.dynamic_qparams(hp, axis=2)  # (D, B, 1): one range per direction and sequence
        codes = mlas.dynamic_codes(hp, scale, zero)
        if self.h_hat is not None:
            np.multiply(codes, scale, out=self.h_hat[:, s])
        acc = mlas.integer_product(codes, RT, self.r_bound)
        np.multiply(acc, scale * self.r_scale[:, None, :], out=out)


def _add_bias(g, bias, cols) -> None:
    """g[..., cols] += the gates' bias (Wb + Rb), if any."""
    if bias is not None:
        g[:, :, cols] += bias[:, :, cols]


@register("GRU")
class GRU(_Recurrent):
    """z = f(X W_z + H R_z + b_z), r = f(X W_r + H R_r + b_r),
    h = g(X W_h + (r H) R_h + Rb_h + Wb_h)   (linear_before_reset 0)   or   g(X W_h + r (H R_h + Rb_h) + Wb_h),
    H' = (1 - z) h + z H. Gate order z, r, h. Saved for backward: the gate activations, the states, and with
    linear_before_reset the products H R_h + Rb_h."""

    n_gates, n_acts = 3, 2
    default_acts = ("Sigmoid", "Tanh")
    attrs = {**_Recurrent.attrs, "linear_before_reset": 0}

    def _bias(self, b):
        bias = super()._bias(b)
        if bias is not None and self.linear_before_reset:
            H = self.H
            bias[:, 2 * H:] = b[:, 2 * H:3 * H]  # Rb_h goes inside r (.) (H R_h + Rb_h)
        return bias

    def forward(self, ctx, x, w, r, b=None, seq_lens=None, h0=None):
        dtype = self.dtype = x.dtype
        xt = self._setup(x, w, r, b, seq_lens)
        S, B, H, D = self.S, self.B, self.H, self.D
        lbr = bool(self.linear_before_reset)
        G = self._project(xt, w, b, dtype)
        grad = ctx.grad
        self.mask = np.empty(G.shape, bool) if grad and self.clip is not None else None
        self.pre = np.empty_like(G) if grad and self.needs_x else None
        Hs = np.empty((D, S + 1, B, H), dtype)
        Hs[:, 0] = self._state(h0, dtype)
        RT = np.ascontiguousarray(r.transpose(0, 2, 1))  # (D, H, 3H)
        rbh = None if b is None or not lbr else b[:, None, 5 * H:6 * H]
        hh_all = np.empty((D, S, B, H), dtype) if grad and lbr else None
        zr, gz, gr_, gh = slice(0, 2 * H), slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
        tmp = np.empty((D, B, H), dtype)
        if lbr:
            tmp3 = np.empty((D, B, 3 * H), dtype)
        else:
            tmp2, rh = np.empty((D, B, 2 * H), dtype), np.empty((D, B, H), dtype)
            RT_zr, RT_h = np.ascontiguousarray(RT[..., zr]), np.ascontiguousarray(RT[..., gh])
        for s in range(S):
            g = G[:, s]
            hp = Hs[:, s]
            if lbr:
                np.matmul(hp, RT, out=tmp3)
                g[:, :, zr] += tmp3[:, :, zr]
                self._activate(0, G, s, zr, self.mask, self.pre)
                hh = tmp3[:, :, gh]
                if rbh is not None:
                    hh += rbh
                if hh_all is not None:
                    hh_all[:, s] = hh
                np.multiply(g[:, :, gr_], hh, out=tmp)
                g[:, :, gh] += tmp
            else:
                np.matmul(hp, RT_zr, out=tmp2)
                g[:, :, zr] += tmp2
                self._activate(0, G, s, zr, self.mask, self.pre)
                np.multiply(g[:, :, gr_], hp, out=rh)
                np.matmul(rh, RT_h, out=tmp)
                g[:, :, gh] += tmp
            self._activate(1, G, s, gh, self.mask, self.pre)
            ht, z = g[:, :, gh], g[:, :, gz]
            np.subtract(hp, ht, out=tmp)                 # H' = h + z (H - h)
            tmp *= z
            np.add(ht, tmp, out=Hs[:, s + 1])
            if self.invalid[s] is not None:
                self._mask_rows(Hs[:, s + 1], hp, s)
        if grad:
            self.x, self.w, self.r, self.b = x, w, r, b
            self.G, self.Hs, self.hh = G, Hs, hh_all
        return self._outputs(Hs, (Hs[:, S],))

    def backward(self, gy=None, gyh=None):
        S, B, H, D = self.S, self.B, self.H, self.D
        G, Hs = self.G, self.Hs
        dtype = G.dtype
        one = dtype.type(1)
        lbr = bool(self.linear_before_reset)
        dyp, (dh,) = self._grad_in(gy, (gyh,))
        gz, gr_, gh = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
        z, rg, ht = G[..., gz], G[..., gr_], G[..., gh]
        hprev = Hs[:, :S]
        a3 = np.empty((D, S, B, 3, H), dtype)  # dpre_z, (dpre_r,) d(r-product) = dH_s * a3
        np.multiply(hprev - ht, self._gate_slope(0, z, gz), out=a3[..., 0, :])
        a_h = (one - z) * self._gate_slope(1, ht, gh)     # dpre_h = dH_s * a_h
        sr = self._gate_slope(0, rg, gr_)
        if lbr:
            np.multiply(a_h * self.hh, sr, out=a3[..., 1, :])   # dpre_r
            np.multiply(a_h, rg, out=a3[..., 2, :])              # d(H R_h + Rb_h)
        else:
            a3[..., 1, :] = 0
            np.copyto(a3[..., 2, :], a_h)
            a_r = hprev * sr                                     # dpre_r = d(r H) * a_r
        z_eff = np.array(z)                                      # dH_prev gets dH_s * z directly
        v = self._valid_f(dtype)
        if v is not None:
            a3 *= v[..., None]
            a_h *= v
            z_eff *= v
            z_eff += one - v
        del sr
        dGr = np.empty((D, S, B, 3 * H), dtype)
        dG3 = dGr.reshape(D, S, B, 3, H)
        dhs_all = np.empty((D, S, B, H), dtype) if lbr else None
        r = self.r
        dhs = np.empty((D, B, H), dtype)
        if not lbr:
            r_zr, r_h = np.ascontiguousarray(r[:, :2 * H]), np.ascontiguousarray(r[:, 2 * H:])
        for s in range(S - 1, -1, -1):
            out = dhs_all[:, s] if lbr else dhs
            if dyp is not None:
                np.add(dh, dyp[:, s], out=out)
            else:
                out[...] = dh
            np.multiply(a3[:, s], out[:, :, None, :], out=dG3[:, s])
            if lbr:
                dh_new = np.matmul(dGr[:, s], r)
            else:
                drh = np.matmul(dG3[:, s, :, 2], r_h)
                np.multiply(drh, a_r[:, s], out=dG3[:, s, :, 1])
                dh_new = np.matmul(dGr[:, s, :, :2 * H], r_zr)
                drh *= rg[:, s]
                dh_new += drh
            dh_new += out * z_eff[:, s]
            dh = dh_new
        flat = self._flat(dGr)
        hflat = self._flat(Hs[:, :S])
        gr = np.empty_like(r) if self._need(2) else None
        rb = None
        if lbr:  # dGr holds the gradients of (z, r, H R_h + Rb_h): R's and R bias's; W's slot h is dpre_h
            if gr is not None:
                self._outer(flat, hflat, gr)
            if self._need(3) and self.b is not None:
                rb = flat.sum(axis=1)
            np.multiply(dhs_all, a_h, out=dG3[..., 2, :])
        elif gr is not None:  # dpre_h multiplies r (.) H
            self._outer(flat[..., :2 * H], hflat, gr[:, :2 * H])
            self._outer(flat[..., 2 * H:], self._flat(rg * hprev), gr[:, 2 * H:])
        gx, gw = self._grad_xw(self.x, self.w, dGr)
        gb = None
        if self._need(3) and self.b is not None:
            wb = flat.sum(axis=1)
            gb = np.concatenate([wb, wb if rb is None else rb], axis=1)
        gh0 = self._state_grad(dh) if self._need(5) else None
        return gx, gw, gr, gb, None, gh0


@register("RNN")
class RNN(_Recurrent):
    """H' = f(X W^T + H R^T + Wb + Rb). `activations` has one name per direction, spelt exactly as in the spec
    (onnxruntime refuses "relu"); two names for one direction are the schema's default, the first is used.
    Saved for backward: the (clipped) pre-activations and the states."""

    n_gates, n_acts = 1, 1
    default_acts = ("Tanh",)

    def _names(self) -> list[str]:
        names = super()._names()
        if len(names) == 2 and self.num_directions == 1:  # the schema's default (Tanh, Tanh): the first
            names = names[:1]
        for name in names:
            if name not in _CANONICAL:
                self._fail(f"activation {name!r} is not supported (one of {', '.join(_CANONICAL)}, spelt so)")
        return names

    def forward(self, ctx, x, w, r, b=None, seq_lens=None, h0=None):
        dtype = self.dtype = x.dtype
        xt = self._setup(x, w, r, b, seq_lens)
        S, B, H, D = self.S, self.B, self.H, self.D
        G = self._project(xt, w, b, dtype)  # pre-activations, clipped in place
        grad = ctx.grad
        self.mask = np.empty(G.shape, bool) if grad and self.clip is not None else None
        self.pre = G
        Hs = np.empty((D, S + 1, B, H), dtype)
        Hs[:, 0] = self._state(h0, dtype)
        RT = np.ascontiguousarray(r.transpose(0, 2, 1))
        tmp = np.empty((D, B, H), dtype)
        for s in range(S):
            g = G[:, s]
            np.matmul(Hs[:, s], RT, out=tmp)
            g += tmp
            if self.clip is not None:
                c = dtype.type(self.clip)
                if self.mask is not None:
                    np.less_equal(np.abs(g), c, out=self.mask[:, s])
                np.clip(g, -c, c, out=g)
            self._apply(0, g, Hs[:, s + 1])
            if self.invalid[s] is not None:
                self._mask_rows(Hs[:, s + 1], Hs[:, s], s)
        if grad:
            self.x, self.w, self.r, self.b = x, w, r, b
            self.G, self.Hs = G, Hs
        return self._outputs(Hs, (Hs[:, S],))

    def backward(self, gy=None, gyh=None):
        S, B, H, D = self.S, self.B, self.H, self.D
        G, Hs = self.G, self.Hs
        dtype = G.dtype
        dyp, (dh,) = self._grad_in(gy, (gyh,))
        a = self._gate_slope(0, Hs[:, 1:], slice(None))
        v = self._valid_f(dtype)
        if v is not None:
            a *= v
        dG = np.empty((D, S, B, H), dtype)
        dhs = np.empty((D, B, H), dtype)
        r = self.r
        for s in range(S - 1, -1, -1):
            if dyp is not None:
                np.add(dh, dyp[:, s], out=dhs)
            else:
                dhs[...] = dh
            np.multiply(dhs, a[:, s], out=dG[:, s])
            dh = np.matmul(dG[:, s], r)
            self._mask_rows(dh, dhs, s)
        gx, gw, gr, gb = self._grads_shared(dG, Hs)
        gh0 = self._state_grad(dh) if self._need(5) else None
        return gx, gw, gr, gb, None, gh0
