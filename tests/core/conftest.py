import pytest
from corearrays import KINDS


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param
