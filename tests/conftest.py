import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave `slow` tests out unless a -m expression asks for them (CI runs the fast subset)."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow fault-injection case: run with `python -m pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a whole test module (tiny tensors: threading costs more than it gives)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny SDXL (random init, fixed seed; smaller than the demo model), built once for the
    session: read-only, a test that changes it copies it."""
    from trainers.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny-sdxl", pretrained=False)


@pytest.fixture
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The demo dataset in tmp_path/data: 6 images, or the test module's DATASET_IMAGES."""
    from trainers.tiny_models import write_demo_dataset

    return write_demo_dataset(tmp_path / "data", num_images=getattr(request.module, "DATASET_IMAGES", 6))
