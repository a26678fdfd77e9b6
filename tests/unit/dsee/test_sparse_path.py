"""The DSEE layer's two sparse-update paths ("autograd", "fused": dsee_dist/dsee/layer.py) give bitwise the same
outputs and gradients, and the path is chosen per device type."""

import pytest
import torch

from dsee_dist.dsee import layer as dsee_layer
from dsee_dist.dsee.layer import DSEELayer, LowRankSparseDelta


@pytest.fixture
def restore_paths():
    before = dict(dsee_layer.SPARSE_UPDATE_PATH)
    yield
    dsee_layer.SPARSE_UPDATE_PATH.clear()
    dsee_layer.SPARSE_UPDATE_PATH.update(before)


def _layer(slices, out_f=96, in_f=40, n=60, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f).requires_grad_(False)
    rows_pool = torch.cat([torch.arange(s, s + size) for s, size in slices]) if slices else torch.arange(out_f)
    # entries sharing rows and columns (as real supports do): the order of additions matters there
    g = torch.Generator().manual_seed(seed)
    rows = rows_pool[torch.randint(0, rows_pool.numel(), (n,), generator=g)]
    cols = torch.randint(0, in_f // 2, (n,), generator=g)
    layer = DSEELayer(base, rank=4, alpha=8, slices=slices, sparse_index=torch.stack([rows, cols]))
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.sparse_values.normal_()
    return layer


def _run(layer, path, x0, grad):
    dsee_layer.set_sparse_update_path("cpu", path)
    x = x0.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(grad)
    return [y.detach(), x.grad, layer.lora_a.grad, layer.lora_b.grad, layer.sparse_values.grad]


@pytest.mark.parametrize("slices", [None, [(0, 32), (64, 32)]], ids=["whole", "q_v_slices"])
@pytest.mark.parametrize("shape", [(7, 40), (3, 5, 40)], ids=["2d", "3d"])
def test_fused_path_equals_autograd_path_bitwise(restore_paths, slices, shape):
    layer = _layer(slices)
    x0, grad = torch.randn(shape), torch.randn(*shape[:-1], 96)
    want = _run(layer, "autograd", x0, grad)
    got = _run(layer, "fused", x0, grad)
    for name, g, w in zip(["output", "x", "lora_a", "lora_b", "sparse_values"], got, want):
        assert torch.equal(g, w), f"{name} differs by {(g - w).abs().max().item():.3g}"


def test_fused_function_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 4, 4, 2]), torch.tensor([1, 1, 5, 0])
    assert torch.autograd.gradcheck(lambda *t: LowRankSparseDelta.apply(*t, rows, cols), (x, a, b, v))


def test_path_is_chosen_per_device_type(restore_paths, monkeypatch):
    layer = _layer(None)
    called = []
    original = LowRankSparseDelta.apply
    monkeypatch.setattr(LowRankSparseDelta, "apply", lambda *a: called.append(1) or original(*a))
    dsee_layer.set_sparse_update_path("cpu", "autograd")
    layer(torch.randn(2, 40))
    assert called == []
    dsee_layer.set_sparse_update_path("cpu", "fused")
    layer(torch.randn(2, 40))
    assert called == [1]
    dsee_layer.set_sparse_update_path("cuda", "fused")  # another device's choice leaves CPU's alone
    dsee_layer.set_sparse_update_path("cpu", "autograd")
    layer(torch.randn(2, 40))
    assert called == [1]
    with pytest.raises(ValueError, match="choose one of"):
        dsee_layer.set_sparse_update_path("cpu", "compiled")


def test_dropout_keeps_the_autograd_path(restore_paths, monkeypatch):
    layer = DSEELayer(torch.nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5, sparse_index=torch.tensor([[1], [2]]))
    monkeypatch.setattr(LowRankSparseDelta, "apply", lambda *a: pytest.fail("fused path used with dropout"))
    dsee_layer.set_sparse_update_path("cpu", "fused")
    layer.train()
    layer(torch.randn(4, 8))
