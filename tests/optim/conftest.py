import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the optimizer tests run many tiny ops; one thread avoids OpenMP contention on small CPUs.
    # Module scope, so it is in place before the module-scoped training fixtures run.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
