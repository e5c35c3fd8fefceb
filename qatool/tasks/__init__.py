"""What a model's outputs mean: one OutputTask per graph output, chosen once (choose_tasks), giving the tensor the
loss is taken on, the loss of the int8 student against the float teacher, and a streaming meter of int8 against
float. numpy only; sits below qatool.train / quant / export / eval (imports only qatool.ir and qatool.errors)."""

from .base import HEADS, LOSS_HEADS, SHAPE_ONLY, Meter, OutputTask, head_node, pre_softmax, sqnr_db
from .choose import choose_tasks
from .ctc import ctc_characters, ctc_greedy_decode, ctc_text, edit_distance
from .kinds import KINDS, ClassMap, Classes, ProbabilityMap, Rows, Sequence, Tensor
from .losses import class_distillation, cross_entropy, kl_divergence, normalised_mse

__all__ = ["HEADS", "KINDS", "LOSS_HEADS", "SHAPE_ONLY", "ClassMap", "Classes", "Meter", "OutputTask",
           "ProbabilityMap", "Rows", "Sequence", "Tensor", "choose_tasks", "class_distillation", "cross_entropy",
           "ctc_characters", "ctc_greedy_decode", "ctc_text", "edit_distance", "head_node", "kl_divergence",
           "normalised_mse", "pre_softmax", "sqnr_db"]
