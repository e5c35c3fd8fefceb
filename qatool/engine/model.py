"""The executor: runs a Graph forward (training or eval mode) and backward, on numpy.

The graph is compiled once into a list of steps (one Op per node, in topological order). Forward walks the list
with a dict of live values, dropping each value after the last step that reads it; each op keeps what its
backward needs, only when a backward will run through it (training mode, on a path from a parameter).
Backward walks the list in reverse over the steps that lie on a path from a parameter to an output,
accumulating gradients per value name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError, QatoolError
from ..ir.batch import FIXED_BATCH_KEY, one_image_inputs
from ..ir.graph import Graph
from ..ir.roles import read_roles
from ..ops import EVAL_REWRITES, Context, Op, make_op


@dataclass
class Step:
    op: Op
    inputs: list[str]
    outputs: list[str]
    on_grad_path: bool  # some input depends on a parameter
    frees: list[str] = field(default_factory=list)  # values no later step reads: dropped once this step has run


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory (a itself when it owns its data)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class Model:
    """A graph ready to run. `params` and `state` are the live arrays the engine computes with."""

    def __init__(self, graph: Graph, seed: int = 0, dtype: type = np.float32):
        """`dtype` is the float type of every computation: float32, or float64 for gradient checks."""
        self.graph = graph
        self.dtype = np.dtype(dtype)
        trainable, state = read_roles(graph)
        # The engine updates these in place: each must be a writable array of its own. Two names can hold one
        # array: PyTorch's exporter merges initializers of equal value (a fresh model's BN running variances and
        # its BN scales are all ones) behind Identity nodes, and constant folding turns those into names for the
        # same array; updated in place, one BN's running variance would then rewrite another layer's scale.
        owners: set[int] = set(id(_root(v)) for k, v in graph.initializers.items()
                               if k not in trainable and k not in state)
        for name in trainable + state:
            value = np.ascontiguousarray(graph.initializers[name], dtype=self.dtype)
            if not value.flags.writeable or id(_root(value)) in owners:
                value = value.copy()
            owners.add(id(_root(value)))
            graph.initializers[name] = value
        self.params: dict[str, np.ndarray] = {k: graph.initializers[k] for k in trainable}
        self.state: dict[str, np.ndarray] = {k: graph.initializers[k] for k in state}
        self.constants: dict[str, np.ndarray] = {
            k: self._as_float(v) for k, v in graph.initializers.items() if k not in self.params and k not in self.state
        }
        self.input_names = graph.input_names
        self.output_names = graph.output_names
        # A batch of 1 convert could not free (`ir.batch`): why, and the inputs then fed one image at a time.
        self.fixed_batch: str | None = graph.metadata.get(FIXED_BATCH_KEY)
        self._one_image = one_image_inputs(graph) if self.fixed_batch is not None else []
        self.ctx = Context(rng=np.random.default_rng(seed))
        graph.toposort()
        self._steps = self._compile(graph, graph.nodes)
        self._eval_steps, self._eval_values = self._compile_eval(graph)
        self._last_forward = False
        self._last_outputs: list[str] = self.output_names

    def _as_float(self, x: np.ndarray) -> np.ndarray:
        """Float arrays in the model's dtype; everything else (int64 shapes, bools) as it is."""
        return x.astype(self.dtype) if np.issubdtype(x.dtype, np.floating) and x.dtype != self.dtype else x

    def _compile(self, graph: Graph, nodes: list) -> list[Step]:
        requires_grad = set(self.params)
        steps = []
        for node in nodes:
            op = make_op(node, graph.opset)
            needs = [bool(i) and i in requires_grad for i in node.inputs]
            op.needs_grad = needs
            on_path = any(needs) and op.differentiable
            if on_path:
                requires_grad.update(o for o in node.outputs if o)
            op.keep_attributes()
            steps.append(Step(op, list(node.inputs), list(node.outputs), on_path))
        last_use: dict[str, int] = {}
        for k, step in enumerate(steps):
            for name in step.inputs + step.outputs:  # an output nothing reads is dropped right after its step
                if name:
                    last_use[name] = k
        held = set(graph.initializers) | set(graph.input_names) | set(graph.output_names)
        for name, k in last_use.items():
            if name not in held:
                steps[k].frees.append(name)
        return steps

    def _compile_eval(self, graph: Graph) -> tuple[list[Step], set[str]]:
        """The steps of eval-mode forwards without a gradient (the first of `ops.EVAL_REWRITES` that applies: the
        quantized chains as the int8 kernels compute them), and every value they make available. float32 models
        only: the rewrites reproduce float32 kernels."""
        nodes = next((n for n in (rewrite(graph) for rewrite in EVAL_REWRITES) if n), None) \
            if self.dtype == np.float32 else None
        if nodes is None:
            return self._steps, set()
        steps = self._compile(graph, nodes)
        values = set(graph.initializers) | set(graph.input_names) | {o for st in steps for o in st.outputs}
        return steps, values

    # ---- running ---------------------------------------------------------------------------------------------
    def forward(self, feeds: dict[str, np.ndarray], training: bool = False,
                outputs: list[str] | None = None, grad: bool | None = None) -> list[np.ndarray]:
        """Run the graph; returns the graph outputs in order. Training mode: BN batch statistics, Dropout on.

        `outputs` names other values to return instead (e.g. the logits feeding a final Softmax); `backward`
        then takes the gradients of those.

        Memory: every intermediate is dropped once its last reader has run, and ops keep what their backward
        needs only with `grad` (default: in training mode) and only where a gradient flows; an eval-mode
        forward keeps nothing for a backward (pass grad=True to differentiate one, as gradient checks do).

        A model whose batch of 1 could not be freed (`fixed_batch`) runs an eval-mode batch one image at a time,
        its outputs joined on their batch axis (as `ir.batch.ort_run_per_image` does on onnxruntime); a batch of
        more than one image to train or differentiate is refused.
        """
        grad = training if grad is None else grad
        if self._one_image:
            n = max((np.shape(feeds[k])[0] for k in self._one_image if np.ndim(feeds.get(k)) >= 1), default=1)
            if n > 1:
                if grad:
                    raise ModelError(f"the model's batch of 1 could not be freed ({self.fixed_batch}): it trains one "
                                     f"image at a time, not {n}")
                return self._per_image(feeds, n, training, outputs)
        wanted = list(outputs) if outputs is not None else self.output_names
        steps = self._steps
        if not training and not grad and self._eval_values.issuperset(wanted):
            steps = self._eval_steps
        keep = set(wanted)
        env: dict[str, np.ndarray | None] = {"": None}
        env.update(self.constants)
        env.update(self.params)
        env.update(self.state)
        for name in self.input_names:
            if name not in feeds:
                raise ModelError(f"missing input {name!r}; the model's inputs are {self.input_names}")
            env[name] = self._as_float(np.asarray(feeds[name]))
        self.ctx.training = training
        self.ctx.on_grid.clear()
        for step in steps:
            xs = [env[i] for i in step.inputs]
            self.ctx.grad = grad and step.on_grad_path
            try:
                out = step.op.forward(self.ctx, *xs)
            except QatoolError:
                raise
            except (ValueError, IndexError, TypeError) as e:
                node = step.op.node
                raise ModelError(f"node {node.name!r} ({node.op_type}) failed: {e}") from e
            if not isinstance(out, tuple):
                out = (out,)
            for name, value in zip(step.outputs, out):
                if name:
                    env[name] = value
            if not (grad and step.on_grad_path):
                step.op.release()
            tally = getattr(self, "_tally", None)
            if tally is not None:  # activation_bytes: the live intermediates once this step's outputs exist
                own, peak = tally
                live = sum(v.nbytes for v in {id(v): v for v in env.values() if isinstance(v, np.ndarray)
                                              and id(v) not in own}.values())
                peak[0] = max(peak[0], live)
            for name in step.frees:
                if name not in keep:
                    env.pop(name, None)
        self.ctx.on_grid.clear()
        self._last_forward = grad
        self._last_outputs = wanted
        try:
            return [env[o] for o in wanted]
        except KeyError as e:
            raise ModelError(f"no value named {e.args[0]!r} in the graph") from None

    def _per_image(self, feeds: dict[str, np.ndarray], n: int, training: bool,
                   outputs: list[str] | None) -> list[np.ndarray]:
        runs = [self.forward({k: v[i:i + 1] if k in self._one_image else v for k, v in feeds.items()}, training,
                             outputs, grad=False) for i in range(n)]
        joined = []
        for parts in zip(*runs):
            # the batch axis: the first of axes 0 and 1 of size 1 (ort_run_per_image's rule), else a new axis 0
            axis = next((a for a in (0, 1) if np.ndim(parts[0]) > a and np.shape(parts[0])[a] == 1), None)
            joined.append(np.stack(parts) if axis is None else np.concatenate(parts, axis=axis))
        return joined

    def activation_bytes(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> int:
        """The most bytes of intermediate values alive at once in an eval-mode forward of `feeds` asking for
        `outputs` (what a forward needs beyond the model's own arrays): measured by running it with a tally."""
        own = {id(v) for v in (*self.constants.values(), *self.params.values(), *self.state.values())}
        self._tally = (own, [0])
        try:
            self.forward(feeds, outputs=outputs)
        finally:
            own, peak = self._tally
            del self._tally
        return peak[0]

    def backward(self, output_grads: list[np.ndarray | None]) -> dict[str, np.ndarray]:
        """Gradients of the parameters for the last forward, given the gradients of the graph outputs."""
        if not self._last_forward:
            raise ModelError("backward() needs a forward() first, in training mode or with grad=True (an eval-mode "
                             "forward keeps nothing for a backward)")
        if len(output_grads) != len(self._last_outputs):
            raise ModelError(f"expected {len(self._last_outputs)} output gradients, got {len(output_grads)}")
        grads: dict[str, np.ndarray] = {}
        for name, g in zip(self._last_outputs, output_grads):
            if g is not None:
                _accumulate(grads, name, np.asarray(g, dtype=self.dtype))
        for step in reversed(self._steps):
            if not step.on_grad_path:
                continue
            gouts = [grads.pop(o, None) if o else None for o in step.outputs]
            if all(g is None for g in gouts):
                continue
            gins = step.op.backward(*gouts)
            if not isinstance(gins, (tuple, list)):
                gins = (gins,)
            for name, g, need in zip(step.inputs, gins, step.op.needs_grad):
                if need and g is not None:
                    _accumulate(grads, name, g)
        return {k: grads[k] if k in grads else np.zeros_like(v) for k, v in self.params.items()}

    # ---- saving ----------------------------------------------------------------------------------------------
    def to_graph(self) -> Graph:
        """The graph with the current parameter and state values."""
        self.graph.initializers.update(self.params)
        self.graph.initializers.update(self.state)
        return self.graph

    def save(self, path: str | os.PathLike) -> None:
        from ..ir.io import save_graph

        save_graph(self.to_graph(), path)


def _accumulate(grads: dict[str, np.ndarray], name: str, g: np.ndarray) -> None:
    prev = grads.get(name)
    grads[name] = g if prev is None else prev + g


def load(path_or_graph, seed: int = 0, dtype: type = np.float32) -> Model:
    """Load any float ONNX model (a path, a ModelProto or a Graph), normalise it for training, and compile it."""
    import onnx

    from ..convert import normalize
    from ..ir.graph import from_onnx
    from ..ir.io import load_graph

    if isinstance(path_or_graph, Graph):
        graph = path_or_graph
    elif isinstance(path_or_graph, onnx.ModelProto):
        graph = from_onnx(path_or_graph)
    else:
        graph = load_graph(path_or_graph)
    graph = normalize(graph, for_training=True).graph
    return Model(graph, seed=seed, dtype=dtype)
