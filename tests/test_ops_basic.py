import numpy as np
import pytest

from opcheck import check_forward, check_grad

rng = np.random.default_rng(0)


def test_relu():
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    check_forward("Relu", [x])
    check_grad("Relu", [x])


@pytest.mark.parametrize("sa,sb", [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((1, 3, 1), (2, 1, 5)), ((3, 1), ())])
def test_add_broadcast(sa, sb):
    a = rng.standard_normal(sa).astype(np.float32)
    b = np.asarray(rng.standard_normal(sb), dtype=np.float32)
    check_forward("Add", [a, b])
    check_grad("Add", [a, b])
