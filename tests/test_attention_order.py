"""Which SDPA kernel the transformer's attention asks torch for: cuDNN first on Hopper only."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from engine.models.denoiser import attention_order


def _first() -> int:
    return torch._C._get_sdp_priority_order()[0]


@pytest.mark.parametrize(("capability", "cudnn_first"), [((9, 0), True), ((8, 9), False), ((10, 0), False), ((8, 0), False)])
def test_cudnn_goes_first_on_hopper_only(monkeypatch, capability, cudnn_first):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    before = torch._C._get_sdp_priority_order()
    with attention_order(torch.device("cuda")):
        assert (_first() == SDPBackend.CUDNN_ATTENTION.value) is cudnn_first
    assert torch._C._get_sdp_priority_order() == before  # the caller's order comes back


def test_the_cpu_keeps_torchs_order(monkeypatch):
    def no_gpu(device=None):
        raise AssertionError("the CPU path must not ask for a GPU's capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    before = torch._C._get_sdp_priority_order()
    with attention_order(torch.device("cpu")):
        assert torch._C._get_sdp_priority_order() == before
