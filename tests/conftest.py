import os
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


@pytest.fixture(autouse=True)
def _module_rng_is_the_tests(request, rng, monkeypatch):
    """A test module's `rng` (the generator its data helpers draw from) is the test's own `rng`: the data a test
    sees never depend on which tests ran before it or in which order."""
    module = getattr(request, "module", None)
    if module is not None and hasattr(module, "rng"):
        monkeypatch.setattr(module, "rng", rng)


# Hypothesis: derandomised (the examples follow from the test, so a failure reproduces) and no example database
# (nothing written into the repository). HYPOTHESIS_PROFILE=explore draws new random examples instead.
try:
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir
except ImportError:  # only tests/test_fuzz.py needs it
    pass
else:
    import tempfile

    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "qatool-hypothesis"))  # its caches: not in the repo
    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
