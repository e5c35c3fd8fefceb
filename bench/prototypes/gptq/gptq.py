"""GPTQ (Frantar et al. 2022) for the weights qatool quantizes, on a BN-folded float model.

For every layer `qatool calibrate` quantizes (layers.quantized_layers): H = 2 X^T X from the layer's float inputs
on calibration lines (Conv: im2col per group, columns = Cin/g*kh*kw; MatMul: columns = input features), scale s =
qatool's weight_scales(folded w) (per output channel, 4-bit full-range grid [-8, 7]), then the columns are
quantized in order with the Cholesky-of-inverse error compensation. The rounded weights are written back as float
w' = q * s, and each channel is checked so that qatool's own weight_scales(w') == s and its rounding of w' gives q
(anchoring the channel's largest element if needed, else the channel falls back to the original weights = RTN).

usage: gptq.py [--lines 128] [--damp 0.01] [--actorder] [--sequential] [--clamp7] -o gptq.onnx
"""
import argparse, json, time
import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort

from layers import quantized_layers
from evalrec import lines
from qatool.quant.qparams import weight_scales, weight_grid, quantize, fake_quant, CLIP_RATIOS

GRID = weight_grid(4)
FOLDED = "/tmp/gptq/folded.onnx"


# ---------------------------------------------------------------- inputs -> X (columns) per group
def conv_columns(x, L):
    """x [C, H, W] (one line) -> [G, K, P] im2col columns, K ordered as weight[o].reshape(-1) = (cin, kh, kw)."""
    w = L["w"]
    cout, cin_g, kh, kw = w.shape
    a = L["attrs"]
    g = int(a.get("group", 1))
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    assert a.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr)))
    C, Hp, Wp = xp.shape
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((C, kh, kw, Ho, Wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xp[:, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
    return cols.reshape(g, cin_g * kh * kw, Ho * Wo)


def columns(x, L):
    if L["op"] == "Conv":
        assert x.shape[0] == 1
        return conv_columns(x[0], L)
    k = L["w"].shape[0]  # MatMul weight [K, M]
    return x.reshape(-1, k).T[None]  # [1, K, P]


def add_h(Hs, x, L):
    X = columns(x, L).astype(np.float64)
    H = np.matmul(X, np.swapaxes(X, 1, 2))
    if Hs.get(L["name"]) is None:
        Hs[L["name"]] = [H, X.shape[2]]
    else:
        Hs[L["name"]][0] += H
        Hs[L["name"]][1] += X.shape[2]


def ort_with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))  # no type: ORT infers
            have.add(n)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def collect(model, layers, paths):
    """{layer name: [H (G, K, K) float64 = sum X X^T, samples]} over the lines in `paths`."""
    names = sorted({L["input"] for L in layers})
    s = ort_with_outputs(model, names)
    Hs = {}
    for p in paths:
        outs = dict(zip(names, s.run(names, {"x": np.load(p)[None]})))
        for L in layers:
            add_h(Hs, outs[L["input"]], L)
    return Hs


# ---------------------------------------------------------------- GPTQ
def gptq_rows(W, H, s, damp=0.01, actorder=False, qmin=GRID.qmin, qmax=GRID.qmax, perm=None):
    """W [G, R, K] (rows = output channels of group g), H [G, K, K], s [G, R] -> integers q [G, R, K].
    Batched over groups; sequential over columns (no lazy blocks: K <= 2880 here)."""
    G, R, K = W.shape
    W = W.astype(np.float64).copy()
    H = H.copy()
    d = np.einsum("gkk->gk", H)
    dead = d == 0
    gi, ki = np.nonzero(dead)
    H[gi, ki, ki] = 1.0
    if perm is None:
        perm = column_order(H, actorder)
    W = np.take_along_axis(W, perm[:, None, :], 2)
    H = np.take_along_axis(np.take_along_axis(H, perm[:, :, None], 1), perm[:, None, :], 2)
    mean_d = np.einsum("gkk->gk", H).mean(1)
    H[:, np.arange(K), np.arange(K)] += (damp * mean_d)[:, None]
    Hinv = np.linalg.inv(H)
    Hinv = (Hinv + np.swapaxes(Hinv, 1, 2)) / 2
    U = np.swapaxes(np.linalg.cholesky(Hinv), 1, 2)  # upper: Hinv = U^T U
    s64 = s.astype(np.float64)
    Q = np.empty((G, R, K), np.int64)
    for i in range(K):
        w = W[:, :, i]
        q = np.clip(np.rint(w / s64), qmin, qmax)
        Q[:, :, i] = q
        err = (w - q * s64) / U[:, i, i][:, None]  # [G, R]
        if i + 1 < K:
            W[:, :, i + 1:] -= err[:, :, None] * U[:, None, i, i + 1:]
    inv = np.argsort(perm, axis=1)
    return np.take_along_axis(Q, inv[:, None, :], 2)


def column_order(H, actorder):
    """[G, K]: descending diag(H) (act-order) or the natural order."""
    G, K, _ = H.shape
    if actorder:
        return np.argsort(-np.einsum("gkk->gk", H), axis=1, kind="stable")
    return np.tile(np.arange(K), (G, 1))


def as_rows(w, L):
    """Weight in qatool's layout -> [Cout, K] rows (Conv: axis 0; MatMul [K, M]: axis 1)."""
    return w.reshape(w.shape[0], -1) if L["op"] == "Conv" else w.T


def from_rows(r, L):
    return r.reshape(L["w"].shape) if L["op"] == "Conv" else r.T


def anchored(q_row, s, w_row_float=None):
    """(float row, tag) whose qatool scale weight_scales(row) is s and whose rounding at that scale is q_row, or None.

    w' = q * s works when the channel's largest |q| is 7 and float32 (7 s) / 7 == s. Otherwise the largest
    element(s) become an anchor A = 7 s / r for one of clip_search's ratios r: then max|w'| / 7 * r = s, and
    the anchor still rounds to its own q at scale s (q = -8 needs r <= 0.9, q = -7 needs r >= 0.95). Every element
    with |q| s > A is set to A too (it must round back to its q). The float32 value of A is walked a few ulps each
    way, since max / 7 * r cannot reach every float32 s. If only a scale one or two ulps off s reproduces q, that
    row is returned tagged "near" (deployed q identical, scale relative difference ~1e-7)."""
    s32 = np.float32(s)
    base = (q_row * s32).astype(np.float32)
    near = None

    def check(row):
        s2 = np.float32(weight_scales(row[None], 0, GRID)[0])
        same_q = np.array_equal(quantize(row[None], np.array([s2]), 0, GRID, 0)[0], q_row)
        return same_q and s2 == s32, same_q and abs(float(s2) / float(s32) - 1) < 5e-7

    exact, close = check(base)
    if exact:
        return base, "exact"
    if close:
        near = (base, "near")
    absq = np.abs(q_row)
    for r in CLIP_RATIOS:
        t = 7.0 / float(r)  # anchor in steps of s
        for v in (-8.0, 7.0, -7.0):
            if v not in q_row or np.clip(np.rint(np.sign(v) * t), GRID.qmin, GRID.qmax) != v:
                continue
            big = absq > t  # these must sit at the anchor too: they have to round back to their own q
            if not np.all(q_row[big] == v):
                continue
            idx = big | (q_row == v) if t <= np.abs(v) else big.copy()
            if not idx.any():
                idx[np.flatnonzero(q_row == v)[0]] = True
            a0 = np.float32(t * float(s32))
            up = down = a0
            for _ in range(12):
                for a in (up, down):
                    row = base.copy()
                    row[idx] = np.float32(np.sign(v)) * a
                    exact, close = check(row)
                    if exact:
                        return row, f"anchor{int(v)}@{float(r):.2f}"
                    if close and near is None:
                        near = (row, "near")
                up = np.nextafter(up, np.float32(np.inf))
                down = np.nextafter(down, np.float32(-np.inf))
    return near


def layer_error(dW, W, H):
    """relative output error tr(dW H dW^T) / tr(W H W^T) over groups; dW, W [G, R, K]."""
    num = np.einsum("grk,gkl,grl->", dW, H, dW)
    den = np.einsum("grk,gkl,grl->", W, H, W)
    return float(num / den)


def quantize_layer(L, H, Hheld, damp, actorder, clamp7, refix=True):
    w = L["w"].astype(np.float32)
    axis = L["axis"]
    s = weight_scales(w, axis, GRID)  # [Cout] what qatool computes on the folded weight
    rows = as_rows(w, L)  # [Cout, K]
    G = H.shape[0]
    R = rows.shape[0] // G
    Wg = rows.reshape(G, R, -1)
    sg = s.reshape(G, R)
    q = gptq_rows(Wg, H, sg, damp, actorder, qmin=-7 if clamp7 else GRID.qmin).reshape(rows.shape[0], -1)
    # RTN as qatool does it
    rtn_rows = as_rows(fake_quant(w, s, 0, GRID, axis)[0], L).astype(np.float64)
    out = np.empty_like(rows)
    q_final = np.empty(rows.shape, np.int8)
    tags = {}
    order = column_order(H, actorder)
    for c in range(rows.shape[0]):
        r = anchored(q[c].astype(np.float32), s[c], rows[c])
        if r is None and refix:
            gi = c // R
            j = int(np.abs(rows[c]).argmax())
            perm = np.concatenate([[j], order[gi][order[gi] != j]])[None]
            qc = gptq_rows(rows[c][None, None], H[gi][None], s[c].reshape(1, 1), damp, actorder,
                           qmin=-7 if clamp7 else GRID.qmin, perm=perm)[0, 0]
            r = anchored(qc.astype(np.float32), s[c], rows[c])
            if r is not None:
                r = (r[0], "refixed-" + r[1])
                q[c] = qc
        if r is None:
            out[c] = rows[c]  # fallback: original weights, qatool rounds them to nearest (RTN)
            tags["fallback"] = tags.get("fallback", 0) + 1
            q_final[c] = np.rint(rtn_rows[c] / s[c])
        else:
            out[c] = r[0]
            q_final[c] = q[c]
            tags[r[1]] = tags.get(r[1], 0) + 1
    new_w = from_rows(out, L).astype(np.float32)
    # what qatool will deploy from new_w
    s2 = weight_scales(new_w, axis, GRID)
    dep = as_rows(fake_quant(new_w, s2, 0, GRID, axis)[0], L).astype(np.float64)
    W64 = rows.astype(np.float64).reshape(G, R, -1)
    stats = {"tags": tags, "scales_equal": int((s2 == s).sum()), "channels": int(s.size),
             "K": int(W64.shape[2]), "groups": G,
             "cal_rel_err_rtn": layer_error(rtn_rows.reshape(G, R, -1) - W64, W64, H),
             "cal_rel_err_gptq": layer_error(dep.reshape(G, R, -1) - W64, W64, H),
             "held_rel_err_rtn": layer_error(rtn_rows.reshape(G, R, -1) - W64, W64, Hheld),
             "held_rel_err_gptq": layer_error(dep.reshape(G, R, -1) - W64, W64, Hheld),
             "frac_q_changed": float((np.rint(dep / s[:, None]) != np.rint(rtn_rows / s[:, None])).mean())}
    stats["q"], stats["s"] = from_rows(q_final, L), s
    return new_w, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--lines", type=int, default=128)
    ap.add_argument("--held", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", action="store_true")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--clamp7", action="store_true", help="GPTQ integers in [-7, 7] (no -8)")
    ap.add_argument("--no-refix", action="store_true", help="no second try (largest |w| column first) before RTN")
    ap.add_argument("--skip", default="", help="comma-separated layer names kept RTN")
    a = ap.parse_args()
    t0 = time.time()
    model = onnx.load(FOLDED)
    model_dq = onnx.load(FOLDED)  # the same with the deployed (dequantized) weights of the layers done so far
    layers, _ = quantized_layers(FOLDED)
    skip = set(filter(None, a.skip.split(",")))
    train = [p for p, _ in lines("train", 600)]
    order = np.random.default_rng(0).permutation(len(train))
    cal = [train[i] for i in order[: a.lines]]
    held = [train[i] for i in order[a.lines: a.lines + a.held]]
    init_index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    report = {"args": vars(a), "layers": {}}
    qs = {}
    todo = [L for L in layers if L["name"] not in skip]
    if not a.sequential:
        Hs = collect(model, todo, cal)
        Hh = collect(model, todo, held)
        t_collect = time.time() - t0
    for L in todo:
        if a.sequential:  # inputs from the model whose earlier layers are already GPTQ'd (float weights q * s)
            Hs = collect(model_dq, [L], cal)
            Hh = collect(model_dq, [L], held)
        tl = time.time()
        new_w, st = quantize_layer(L, Hs[L["name"]][0], Hh[L["name"]][0], a.damp, a.actorder, a.clamp7,
                                   not a.no_refix)
        st["samples"] = Hs[L["name"]][1]
        st["seconds"] = round(time.time() - tl, 2)
        model.graph.initializer[init_index[L["weight"]]].CopyFrom(numpy_helper.from_array(new_w, L["weight"]))
        dq = fake_quant(new_w, weight_scales(new_w, L["axis"], GRID), 0, GRID, L["axis"])[0].astype(np.float32)
        model_dq.graph.initializer[init_index[L["weight"]]].CopyFrom(numpy_helper.from_array(dq, L["weight"]))
        qs[L["weight"]], qs[L["weight"] + "|scale"] = st.pop("q"), st.pop("s")
        report["layers"][L["name"]] = st
        db = lambda e: -10 * np.log10(max(e, 1e-30))
        print(f"{L['name']:14s} K={st['K']:5d} G={st['groups']:3d} n={st['samples']:7d} "
              f"cal dB rtn {db(st['cal_rel_err_rtn']):6.2f} gptq {db(st['cal_rel_err_gptq']):6.2f} | "
              f"held rtn {db(st['held_rel_err_rtn']):6.2f} gptq {db(st['held_rel_err_gptq']):6.2f} | "
              f"changed {100 * st['frac_q_changed']:.1f}% {st['tags']} scales== {st['scales_equal']}/{st['channels']}",
              flush=True)
    onnx.save(model, a.output)
    np.savez(a.output.replace(".onnx", "_q.npz"), **qs)
    report["seconds_total"] = round(time.time() - t0, 1)
    if not a.sequential:
        report["seconds_collect"] = round(t_collect, 1)
    fb = sum(st["tags"].get("fallback", 0) for st in report["layers"].values())
    ch = sum(st["channels"] for st in report["layers"].values())
    report["fallback_channels"], report["channels"] = fb, ch
    tags = {}
    for st in report["layers"].values():
        for k, v in st["tags"].items():
            tags[k] = tags.get(k, 0) + v
    report["tags"] = tags
    print(f"total {report['seconds_total']} s; fallback channels {fb}/{ch}; tags {json.dumps(tags)}")
    json.dump(report, open(a.output.replace(".onnx", ".json"), "w"), indent=1)


if __name__ == "__main__":
    main()
