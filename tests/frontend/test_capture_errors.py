"""A capture error raised inside library code names the module that was running, the library frame
and the user's frame (frames under site-packages are not dropped)."""
import importlib
import sys

import pytest
import torch
import torch.nn as nn

from frontend.torch_capture import CaptureError, capture
from tests.models import LabelledLoss, lm_inputs

LIBRARY = '''
import torch


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(4, 2)

    def forward(self, x):
        scores = self.gate(x)
        if scores.max() > 0:  # data-dependent: torch.export cannot follow it
            return x * 2
        return x
'''


@pytest.fixture
def library_router(tmp_path, monkeypatch):
    """A module class from a package installed under a site-packages folder."""
    root = tmp_path / "site-packages"
    (root / "fakelib").mkdir(parents=True)
    (root / "fakelib" / "__init__.py").write_text("")
    (root / "fakelib" / "routing.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(root))
    yield importlib.import_module("fakelib.routing").Router
    for name in ("fakelib.routing", "fakelib"):
        sys.modules.pop(name, None)


def test_library_error_names_module_library_frame_and_user_frame(library_router):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = library_router()

        def forward(self, x):
            return self.router(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x.sum()

    with pytest.raises(CaptureError) as err:
        capture(Model(), (torch.randn(3, 4),), method="export")
    message = str(err.value)
    assert "in module blocks.0.router (Router)" in message
    assert "at fakelib/routing.py:12 (in forward)" in message
    assert f"called from {__file__}:" in message and "(in forward)" in message.split("called from")[1]
    assert "torch.where" in message


@pytest.mark.slow
def test_eager_moe_loop_of_transformers_names_the_experts_module():
    """Mixtral's eager experts loop branches on which experts got tokens (data-dependent)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._experts_implementation = "eager"
    with pytest.raises(CaptureError) as err:
        capture(LabelledLoss(MixtralForCausalLM(cfg)), lm_inputs(batch=2, seq=4), method="export")
    message = str(err.value)
    assert "in module lm.model.layers.0.mlp.experts (MixtralExperts)" in message
    assert "at transformers/models/mixtral/modeling_mixtral.py:" in message
    assert "tests/models.py:" in message.split("called from")[1]
