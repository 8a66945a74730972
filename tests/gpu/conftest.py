"""tests/gpu runs only where CUDA is: everywhere else (CI) every test here is skipped, not
failed."""
import pathlib

import pytest
import torch

_HERE = pathlib.Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if _HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
