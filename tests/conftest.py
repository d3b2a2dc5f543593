"""Test-wide settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tensors in tests are tiny: on a shared 2-core machine a second intra-op thread only
    spin-waits (and the torchrun tests' ranks compete for the same cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def stop_shared_launches():
    """At the end of the session, stop the long-lived torchrun launches the multi-process tests shared
    (``tests.launch.run_programs``) and remove their queue folders."""
    yield
    from tests.launch import stop_warm_launches
    stop_warm_launches()
