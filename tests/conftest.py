import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so a pass is repeatable."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests' tiny tensors gain nothing from two, and on a busy 2-core machine
    every parallel region can stall for milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
