"""What a training step minimises: the tensors it asks the model for, the loss on them and its gradients.

Chosen once per run, so the loop never asks which kind of model it trains:
- `LabelledClasses`: a classifier with labels: cross-entropy on the logits, or with a teacher the
  distillation loss (`--teacher`: alpha * T^2 * KL + (1 - alpha) * CE);
- `Distillation`: any model, no labels needed: the float model is the teacher, and every chosen output's task
  (qatool.tasks) gives the loss between the student's tensor and the teacher's (KL over the class axis for
  logits, normalised MSE for maps, boxes and features); the step's loss is their sum.
Each is called with the step's tensors (in `tensors` order), the input batch and its labels (None without), and
returns (loss, gradients of the tensors, correct predictions or None).
"""

from __future__ import annotations

from .loss import distillation_loss, softmax_cross_entropy


class LabelledClasses:
    """Cross-entropy of a classifier's logits against the labels; with a `teacher`, Hinton's distillation mix."""

    def __init__(self, logits: str, teacher=None, temperature: float = 4.0, alpha: float = 0.5):
        self.tensors = [logits]
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, outs, x, labels):
        out = outs[0]
        logits = out.reshape(len(out), -1)  # a (N, C, 1, 1) head's logits as (N, C)
        if self.teacher is not None:
            target = self.teacher(x)[0]
            loss, grad = distillation_loss(logits, target.reshape(len(target), -1), labels, self.temperature,
                                           self.alpha)
        else:
            loss, grad = softmax_cross_entropy(logits, labels)
        return loss, [grad.reshape(out.shape)], int((logits.argmax(1) == labels).sum())

    def describe(self) -> str:
        if self.teacher is None:
            return f"cross-entropy on {self.tensors[0]} against the labels"
        return (f"distillation from {self.teacher.path} on {self.tensors[0]}: T {self.temperature}, "
                f"alpha {self.alpha}")


class Distillation:
    """Label-free: the sum of each task's loss between the student's tensor and the float teacher's. `features`:
    more tasks on intermediate tensors (`feature_tasks`), in the loss only (the judge measures the outputs); the
    teacher gives the outputs' loss tensors, then the features'."""

    def __init__(self, tasks, teacher, features=()):
        self.tasks = list(tasks) + list(features)
        self.features = list(features)
        self.tensors = [t.loss_tensor for t in self.tasks]
        self.teacher = teacher

    def __call__(self, outs, x, labels):
        targets = self.teacher(x)
        total, grads = 0.0, []
        for task, s, t in zip(self.tasks, outs, targets):
            loss, grad = task.loss(s, t.astype(s.dtype, copy=False))
            total += loss
            grads.append(grad.astype(s.dtype, copy=False).reshape(s.shape))
        return total, grads, None

    def describe(self) -> str:
        parts = [f"{t.loss_name} on {t.loss_tensor}" for t in self.tasks if t not in self.features]
        if self.features:
            parts.append(f"nmse on {len(self.features)} input{'s' if len(self.features) > 1 else ''} of the last "
                         "weighted layers")
        return f"distillation from the float model, no labels: {'; '.join(parts)}"


FEATURE_CHOICES = ("none", "tail-inputs")


def feature_tasks(plan, float_graph, choice: str = "none") -> list:
    """Intermediate tensors to distil besides the outputs. "tail-inputs": the input of every layer that keeps a
    float output (the last weighted layers: PaddleSlim ACT's rule, the head convolutions' inputs), each a Tensor
    task (normalised MSE); "none": no feature. A tensor the float model's inference form does not hold (folded
    away) is left out."""
    from ..convert import normalize
    from ..tasks.kinds import Tensor

    if choice == "none":
        return []
    infer = normalize(float_graph, for_training=False).graph
    known = set(infer.input_names) | {o for n in infer.nodes for o in n.outputs if o}
    tasks = {}
    for layer in plan.layers:
        name = layer.node.inputs[0]
        if layer.float_output and name in known and name not in infer.input_names and name not in tasks:
            tasks[name] = Tensor(name, why=f"the input of {layer.node.name}, a last weighted layer")
    return list(tasks.values())
