"""What the runtime builds once and keeps (packed weights, fused projections, RoPE tables, draft
rows) works the same whether it was first made inside `torch.inference_mode()` or outside it.

The defect this guards: a bf16 LM head packed lazily during a decode loop (inference mode) became
an inference tensor; the next teacher pass outside inference mode (training, fidelity) then failed
with "Inference tensors do not track version counter". It showed only on CPUs with oneDNN bf16
(AVX512-BF16), where the packed path runs, and only in test orders that decoded first.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded, tiny_model
from exitspec.heads.bundle import HeadBundle
from exitspec.models.int4 import int4_table
from exitspec.models.ops import Linear, in_place_version
from exitspec.runtime.layered import LayeredModel
from exitspec.runtime.sequences import teacher_pass
from test_int4 import backend, q4_1  # noqa: F401  (backend: a fixture)


def _linear(dtype):
    torch.manual_seed(0)
    return torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype), torch.randn(3, 64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first_inside", [True, False])
def test_linear_packed_in_one_mode_serves_the_other(dtype, first_inside):
    w, b, x = _linear(dtype)
    lin = Linear(w, b)
    inside = torch.inference_mode
    first, then = (inside, torch.no_grad) if first_inside else (torch.no_grad, inside)
    with first():
        y1 = lin(x)
    with then():
        y2 = lin(x)
    y3 = lin(x)  # grad mode, no input needing grad: the packed path too
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    if lin._packed is not None:  # the packed copy (oneDNN bf16 CPUs) is never an inference tensor
        assert not lin._packed.is_inference()


def test_linear_over_an_inference_weight_is_packed_once_and_used_outside():
    """A weight made inside inference mode (an HF model loaded under it) has no version counter."""
    w, b, x = _linear(torch.bfloat16)
    with torch.inference_mode():
        w_inf = w.clone()
        lin = Linear(w_inf, b.clone())
    assert w_inf.is_inference() and in_place_version(w_inf) == -2
    with torch.no_grad():
        y = lin(x)
    with torch.inference_mode():
        assert torch.equal(lin(x), y)
    ref = Linear(w, b)
    assert torch.equal(ref(x), y)


def test_a_packed_weight_follows_in_place_changes():
    w, b, x = _linear(torch.bfloat16)
    lin = Linear(w, b)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        w.mul_(2)
    with torch.inference_mode():
        after = lin(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, Linear(w.clone(), b)(x))


def _hf_model(kind: str) -> tuple[torch.nn.Module, dict | None]:
    model = tiny_model("llama")
    if kind == "dense":
        return model, None
    head = model.get_output_embeddings()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head:
                mod.weight.copy_(q4_1(mod.weight))
    return model, int4_table(model)


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_runtime_built_and_decoded_in_inference_mode_then_trains_heads_outside(kind, backend):  # noqa: F811
    """Build the runtime and decode inside inference mode (as generate does), then run the teacher
    and backpropagate into a head outside it (as training does), then the reverse."""
    ids = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9]])
    pos = torch.arange(8)[None]
    model, int4 = _hf_model(kind)
    with torch.inference_mode():
        lm = LayeredModel(model, int4=int4)
        decoded = lm.forward(ids, pos, lm.new_cache(1, 8))
    tp = teacher_pass(lm, ids, [2])
    assert not tp.logits.is_inference() and not tp.hidden[2].is_inference()
    assert torch.equal(tp.logits, decoded)
    bundle = HeadBundle.create(lm, [2], "linear")
    bundle.train()
    loss = bundle.head(2)(tp.hidden[2]).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in bundle.heads.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.inference_mode():  # and back: what the teacher pass built serves a decode loop
        again = lm.forward(ids, pos, lm.new_cache(1, 8))
    assert torch.equal(again, decoded)


def test_loaded_model_runtime_first_touched_in_inference_mode():
    m = tiny_loaded("llama")
    with torch.inference_mode():
        _ = m.lm  # the cached runtime is built here
    params = list(m.model.parameters())  # fused q|k|v views point into a buffer built above
    assert not any(p.is_inference() for p in params)
    out = m.model(torch.tensor([[1, 2, 3]])).logits  # HF's own forward, outside inference mode
    assert not out.is_inference()
