import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SAMPLE_DIR  # noqa: E402


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.png"))[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) image folders: a small subset of the bundled MNIST digits (real images)."""
    root = tmp_path_factory.mktemp("digits")
    data = SAMPLE_DIR / "data" / "mnist"
    return _subset(data / "train", root / "train", 40), _subset(data / "val", root / "val", 20)


@pytest.fixture(scope="session")
def lenet() -> Path:
    return SAMPLE_DIR / "lenet_bn.onnx"


@pytest.fixture(scope="session")
def mobilenet() -> Path:
    return SAMPLE_DIR / "mobilenetv2_small.onnx"


def _seed(nodeid: str) -> int:
    """A stable seed per test: the same data whatever else runs, in whatever order (crc32 of the test's id)."""
    import zlib

    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded for this test alone."""
    return np.random.default_rng(_seed(request.node.nodeid))
