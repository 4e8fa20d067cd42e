"""Model specs are data: registered builders only, plain values, no code named by a file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.load import load_weights, read_state_dict, strip_wrapper_prefixes
from kdkit.registry import ModelSpec, build_model, check_plain, list_models


def test_registered_prefixes_build_modules():
    assert type(build_model("kdkit:fmnist_student")).__name__ == "SmallCNN"
    r18 = build_model({"model": "torchvision:resnet18", "kwargs": {"num_classes": 3}})
    assert r18.fc.out_features == 3
    timm_net = build_model({"model": "timm:resnet10t", "kwargs": {"num_classes": 4}})
    assert timm_net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert "fmnist_teacher" in list_models("kdkit")


def test_legacy_factory_specs_map_onto_the_registry():
    spec = ModelSpec.parse({"factory": "kdkit.models:fmnist_teacher", "kwargs": {}})
    assert spec.model == "kdkit:fmnist_teacher"
    assert ModelSpec.parse({"factory": "pkg.mod:fn"}).model == "python:pkg.mod:fn"
    assert ModelSpec.parse(spec.to_dict()) == spec


def test_a_file_naming_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = {"factory": "subprocess:call", "kwargs": {"args": ["sh", "-c", "id > PWNED"]}}
    with pytest.raises(KDError, match="would import 'subprocess' and call 'call'.*trust_code"):
        build_model(evil)
    assert not (tmp_path / "PWNED").exists()


def test_python_spec_runs_only_with_trust_code():
    spec = {"model": "python:torch.nn:Linear", "kwargs": {"in_features": 2, "out_features": 3}}
    with pytest.raises(KDError, match="trust_code=True"):
        build_model(spec)
    assert isinstance(build_model(spec, trust_code=True), nn.Linear)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("resnet18", "PREFIX:NAME"),
        ("nope:resnet18", "unknown model prefix"),
        ("torchvision:resnet181", "did you mean.*resnet18"),
        ("kdkit:fmnist_studnet", "did you mean.*fmnist_student"),
        ({"model": "kdkit:fmnist_student", "kwarg": {}}, "unknown key"),
        ({"model": "kdkit:fmnist_student", "kwargs": {"num_clases": 3}}, "does not take"),
        ({"model": "kdkit:fmnist_student", "kwargs": {"x": object()}}, "not a plain value"),
        (42, "must be a string"),
    ],
)
def test_bad_specs_are_one_clear_error(spec, match):
    with pytest.raises(KDError, match=match):
        build_model(spec)


def test_check_plain_names_the_path():
    check_plain({"a": [1, 2.0, "x", None, {"b": True}]}, "kwargs")
    with pytest.raises(KDError, match=r"kwargs\.a\[1\]"):
        check_plain({"a": [1, {1, 2}]}, "kwargs")


def test_weights_files_load_from_torch_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = build_model("kdkit:fmnist_student")
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "w.pt")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        dst = load_weights(build_model("kdkit:fmnist_student"), tmp_path / name)
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    assert strip_wrapper_prefixes({"module.a._orig_mod.b": 1}) == {"a.b": 1}


def test_bad_weights_files_are_refused(tmp_path):
    (tmp_path / "notes.md").write_text("# not weights")
    with pytest.raises(KDError, match="not a readable torch weights file"):
        read_state_dict(tmp_path / "notes.md")
    with pytest.raises(KDError, match="no weights file"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save(build_model("kdkit:fmnist_teacher").state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(KDError, match="do not fit SmallCNN"):
        load_weights(build_model("kdkit:fmnist_student"), tmp_path / "teacher.pt")


def test_a_kdkit_checkpoint_as_weights_is_checksummed(tmp_path):
    from kdkit.load import save_checkpoint

    model = build_model("kdkit:fmnist_student")
    path = save_checkpoint(tmp_path / "t.pt", {"teacher": model.state_dict()}, role="teacher")
    load_weights(build_model("kdkit:fmnist_student"), path)  # unwraps "teacher"
    state = torch.load(path, weights_only=True)
    state["teacher"]["fc.weight"][0, 0] += 1.0
    torch.save(state, path)
    with pytest.raises(KDError, match="fails its checksum"):
        load_weights(build_model("kdkit:fmnist_student"), path)


def test_the_model_zoo_is_a_plain_table_and_user_builders_still_register(monkeypatch):
    import ast
    import inspect

    import kdkit.models
    from kdkit import registry

    tree = ast.parse(inspect.getsource(kdkit.models))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("kdkit")]
    assert set(kdkit.models.MODELS) == {"fmnist_teacher", "fmnist_student"}

    monkeypatch.setattr(registry, "_KDKIT_MODELS", {})

    @registry.register_model(name="tiny_linear")
    def tiny(width: int = 3) -> nn.Module:
        return nn.Linear(2, width)

    assert build_model({"model": "kdkit:tiny_linear", "kwargs": {"width": 5}}).out_features == 5
    assert list_models("kdkit") == ["fmnist_student", "fmnist_teacher", "tiny_linear"]
    with pytest.raises(KDError, match="did you mean"):
        build_model("kdkit:tiny_linea")


def test_the_weights_file_half_lives_in_load_and_registry_says_where():
    import kdkit.load
    from kdkit import registry
    from kdkit.capture import strip_prefixes

    for name in ("strip_wrapper_prefixes", "read_state_dict", "load_weights"):
        with pytest.raises(KDError, match=f"kdkit.load.{name}"):  # no import back up: a pointer
            getattr(registry, name)
    keys = ["module._orig_mod.a", "_orig_mod.module.b.c", "d._orig_mod.e", "f"]
    stripped = kdkit.load.strip_wrapper_prefixes(dict.fromkeys(keys, 0))
    assert list(stripped) == [strip_prefixes(k) for k in keys] == ["a", "b.c", "d.e", "f"]
    with pytest.raises(AttributeError):
        registry.load_weight  # noqa: B018
