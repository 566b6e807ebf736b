import pytest
import torch

from helpers import write_text_data

pytest_plugins = ["netns"]  # the bridged_namespaces fixture

torch.set_num_threads(1)


@pytest.fixture
def text_data(tmp_path):
    return write_text_data(tmp_path / "data.jsonl")
