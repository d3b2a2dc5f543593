"""Models the tests compile: the bundled GPT, transformers' GPT-2 and Llama from tiny configs, CNNs (with
BatchNorm: a hand-written ResNet-style model and transformers' ResNet)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt  # noqa: E402

VOCAB = 128


def gpt_model(n_layer: int = 2, seed: int = 0) -> nn.Module:
    """The bundled GPT example (tied embedding and head)."""
    return gpt.make_model(n_layer=n_layer, seed=seed)


def gpt_inputs(batch: int = 8, seq: int = 16, seed: int = 1):
    """Token ids and targets for :func:`gpt_model`."""
    return gpt.example_inputs(batch=batch, seq=seq, seed=seed)


class LabelledLoss(nn.Module):
    """Wraps a transformers model so that ``forward(inputs, labels)`` returns its ``.loss``.

    ``input_key`` names the model's input argument: ``input_ids`` (language models),
    ``input_features`` (Whisper), ``pixel_values`` (image classifiers).
    """

    def __init__(self, lm: nn.Module, input_key: str = "input_ids"):
        super().__init__()
        self.lm = lm
        self.input_key = input_key

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm(**{self.input_key: inputs}, labels=labels).loss


def gpt2_model(seed: int = 0, n_layer: int = 2) -> nn.Module:
    """transformers' GPT2LMHeadModel from a tiny config (no dropout, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return LabelledLoss(GPT2LMHeadModel(cfg))


def llama_model(seed: int = 0, n_layer: int = 2) -> nn.Module:
    """transformers' LlamaForCausalLM from a tiny config (grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LabelledLoss(LlamaForCausalLM(cfg))


def lm_inputs(batch: int = 8, seq: int = 16, seed: int = 1):
    """input_ids and labels for the transformers models (labels include ignored positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


class SmallCNN(nn.Module):
    """Conv, ReLU, max-pool, conv, global average pool and a linear classifier; returns the loss."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.cross_entropy(self.head(x), labels)


class BatchNormCNN(nn.Module):
    """Conv, BatchNorm (batch statistics in training, running statistics updated), ReLU, pooling, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(images)))
        return F.cross_entropy(self.head(x.mean((2, 3))), labels)


def bn_cnn_model(seed: int = 0) -> nn.Module:
    """:class:`BatchNormCNN`, deterministically initialised."""
    torch.manual_seed(seed)
    return BatchNormCNN()


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the block's input, then ReLU; the ReLUs and the sum run in place."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResNetStyle(nn.Module):
    """A conv-BN-ReLU stem, two residual blocks, global average pooling and a linear head; returns the loss."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(images))
        return F.cross_entropy(self.head(x.mean((2, 3))), labels)


def resnet_style_model(seed: int = 0) -> nn.Module:
    """:class:`ResNetStyle` with non-trivial running statistics (as after some training)."""
    torch.manual_seed(seed)
    model = ResNetStyle()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(5)
    return model


class ImageClassifierLoss(nn.Module):
    """Wraps a transformers image classifier so that ``forward(pixel_values, labels)`` returns the loss."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values=pixel_values, labels=labels).loss


def hf_resnet_model(seed: int = 0) -> nn.Module:
    """transformers' ResNetForImageClassification from a tiny config (basic blocks, 10 classes)."""
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=10)
    return ImageClassifierLoss(ResNetForImageClassification(cfg))


def cnn_model(seed: int = 0) -> nn.Module:
    """The small CNN, deterministically initialised."""
    torch.manual_seed(seed)
    return SmallCNN()


def cnn_inputs(batch: int = 8, seed: int = 1):
    """Images and class labels for :func:`cnn_model`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)


def eager_loss_and_grads(model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict]:
    """Single-device reference: the loss and the gradient of every parameter that gets one.

    Frozen parameters (``requires_grad=False``) get none, so they are not in the dict.
    """
    model.zero_grad(set_to_none=True)
    loss = model(*inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_close_to_eager(result, model: nn.Module, inputs: tuple, rtol: float = 1e-5, atol: float = 1e-6,
                          reference: tuple[torch.Tensor, dict] | None = None) -> None:
    """A virtual run's loss and every gradient equal eager single-device backward.

    The run must give exactly eager's set of gradients (none for frozen parameters).
    ``reference``: eager's ``(loss, grads)`` from :func:`eager_loss_and_grads`, when already computed.
    """
    loss, grads = reference if reference is not None else eager_loss_and_grads(model, inputs)
    torch.testing.assert_close(result.loss, loss, rtol=rtol, atol=atol)
    assert set(result.grads) == set(grads), (f"gradients only in the run: {sorted(set(result.grads) - set(grads))}; "
                                             f"only in eager: {sorted(set(grads) - set(result.grads))}")
    for name, g in grads.items():
        torch.testing.assert_close(result.grads[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


LOW_PRECISION_FACTOR = 2.0
"""How much farther from the exact result than eager low-precision PyTorch a plan may land (see below)."""
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
"""Half the distance between 1 and the next representable number: the relative error of one rounding."""


def widened(model: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    """A float32 copy of a low-precision model and its float inputs: the same values, exact arithmetic
    as far as float32 goes (the reference low-precision results are measured against)."""
    return copy.deepcopy(model).float(), tuple(t.float() if t.is_floating_point() else t for t in inputs)


def low_precision_references(model: nn.Module, inputs: tuple) -> tuple[tuple, tuple]:
    """Eager ``(loss, grads)`` of the low-precision model, and of its float32 copy (:func:`widened`)."""
    return eager_loss_and_grads(model, inputs), eager_loss_and_grads(*widened(model, inputs))


def assert_low_precision_close(name: str, value: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                               low: torch.dtype | None = None) -> None:
    """``value`` is within the low-precision bar of the float32 result ``exact``:

        |value - exact| <= LOW_PRECISION_FACTOR * |eager - exact| + u * |exact|   (2-norms over the tensor)

    where ``eager`` is eager PyTorch's result in the same low precision and u its unit roundoff (of ``low``,
    the model's dtype, for a value eager computes in float32 from it: transformers' upcast loss). Why this
    bar: eager low-precision PyTorch and a plan round every op's result alike; they differ only in the
    order of summation (a reduction split over ranks, partial sums combined by collectives), in one
    more rounding of each partial result, and in accumulating in float32 where eager CPU kernels
    accumulate in the low precision (NLL, the division of a mean; ``ir/precision.py``). Each of these
    errors is of the size of eager's own rounding errors and propagates through the same network, so
    the plan's distance to the exact result stays within a small multiple of eager's (2: measured
    worst 1.1 over the GPT, GPT-2 and Llama plans of ``tests/compiler/test_low_precision.py``). The
    floor ``u * |exact|`` is one rounding of the result itself: where eager happens to be (nearly)
    exact, a split sum may still round once more. A wrong plan (a missing partial sum, a wrong count)
    misses by far more: errors of order 1, against eager's ~1e-2.
    """
    u = UNIT_ROUNDOFF[low or eager.dtype]
    assert value.dtype == eager.dtype, f"{name}: dtype {value.dtype}, eager's is {eager.dtype}"
    value, eager, exact = (t.detach().double() for t in (value, eager, exact))
    error, eager_error = (value - exact).norm().item(), (eager - exact).norm().item()
    bound = LOW_PRECISION_FACTOR * eager_error + u * exact.norm().item()
    assert error <= bound, (f"{name}: {error:.3g} from the float32 result, eager {eager.dtype} is {eager_error:.3g} "
                            f"from it; the bar is {LOW_PRECISION_FACTOR} x {eager_error:.3g} + {u:.3g} x "
                            f"{exact.norm().item():.3g} = {bound:.3g}")


def assert_low_precision_run_close(result, model: nn.Module, inputs: tuple, references: tuple | None = None) -> None:
    """A virtual run of a low-precision model: its loss and every gradient within the low-precision bar
    (:func:`assert_low_precision_close`) of eager's, in eager's dtypes. ``references``: from
    :func:`low_precision_references`, when already computed."""
    (loss, grads), (exact_loss, exact_grads) = references or low_precision_references(model, inputs)
    assert set(result.grads) == set(grads), (f"gradients only in the run: {sorted(set(result.grads) - set(grads))}; "
                                             f"only in eager: {sorted(set(grads) - set(result.grads))}")
    low = next(p.dtype for p in model.parameters() if p.dtype in UNIT_ROUNDOFF)
    assert_low_precision_close("loss", result.loss, loss, exact_loss, low)
    for name, g in grads.items():
        assert_low_precision_close(name, result.grads[name], g, exact_grads[name], low)
