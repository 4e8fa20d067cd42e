import pytest
import torch
from torch import nn

from kdkit import KDError
from kdkit.capture import Capture, capture, resolve_module, unwrap


def tiny():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()))


def test_capture_records_named_outputs_and_cleans_up():
    m = tiny()
    x = torch.randn(3, 4)
    with capture(m, ["0", "2.1"]) as cap:
        y = m(x)
    assert torch.equal(cap["0"], m[0](x))
    assert torch.equal(cap["2.1"], y)
    assert all(not mod._forward_hooks for mod in m.modules())


def test_wrong_name_suggests_closest():
    m = tiny()
    with pytest.raises(KDError) as err:
        Capture(m, ["2.0.weight_x"])
    assert "did you mean" in str(err.value) and "2.0" in str(err.value)


def test_names_resolve_through_dataparallel_and_compile_prefixes():
    m = tiny()
    wrapped = nn.DataParallel(m)
    assert resolve_module(wrapped, "module.2.0") is m[2][0]
    assert resolve_module(wrapped, "2.0") is m[2][0]
    assert resolve_module(m, "_orig_mod.module.2.0") is m[2][0]
    assert unwrap(wrapped) is m


def test_missing_output_is_a_clear_error():
    m = tiny()
    cap = Capture(m, ["0"])
    with pytest.raises(KDError, match="produced no output"):
        cap["0"]
    cap.remove()
