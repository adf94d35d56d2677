import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def pytest_addoption(parser):
    parser.addoption("--auto-dtype", choices=["bfloat16", "float32"], help="what --dtype auto picks on this CPU, for "
                     "every test (in process and in the scripts it launches) instead of the speed measurement: the "
                     "suite as it runs on a CPU of the other kind (bf16 units, or AVX2 only)")


def pytest_configure(config):
    forced = config.getoption("--auto-dtype")
    if forced:
        os.environ["GPT2_TEST_AUTO_DTYPE"] = forced  # (runtime.FORCE_AUTO_DTYPE; inherited by subprocesses)
    config.addinivalue_line("markers", "slow: minutes-long end-to-end checks; run with `pytest -m slow`")
    config.addinivalue_line("markers", "cuda: the GPU check, minutes on one CUDA GPU; run with `pytest -m cuda`")


@pytest.fixture
def small_text(tmp_path):
    """The first 20,000 characters of Tiny Shakespeare (about 5,600 tokens) in a fresh folder."""
    with open(os.path.join(REPO, "input.txt"), encoding="utf-8") as f:
        text = f.read(20_000)
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)
