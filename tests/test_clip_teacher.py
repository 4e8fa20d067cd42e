"""ClipTeacher on a tiny open_clip model built offline (random weights, open_clip's factory)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import CosineEmbedding, Distiller, FeatureMSE, KDError, Trainer
from kdkit.data import ArrayDataset, FastLoader
from kdkit.data.pipeline import InputPipeline
from kdkit.run.clip_probe import embed, fit_probe
from kdkit.teachers import ClipTeacher
from kdkit.teachers.clip_teacher import ClipInput, clip_teacher_from_config

open_clip = pytest.importorskip("open_clip")

TINY = "kdkit-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """(model, tokenizer) of a registered tiny config; the model is never modified."""
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(TINY), open_clip.get_tokenizer(TINY)


def test_zero_shot_logits_match_float64_formula(tiny):
    model, tok = tiny
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    teacher = ClipTeacher.zero_shot(model, tok, CLASSES, templates)
    x = torch.randn(5, 3, 32, 32)
    out = teacher(x)

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        weights = []
        for c in CLASSES:
            t = ref.encode_text(tok([f"a photo of a {c}.", f"a drawing of a {c}."]))
            t = t / t.norm(dim=-1, keepdim=True)
            w = t.mean(0)
            weights.append(w / w.norm())
        img = ref.encode_image(x.double())
        expected = (
            ref.logit_scale.exp() * (img / img.norm(dim=-1, keepdim=True)) @ torch.stack(weights).T
        )
    assert out.logits.dtype == torch.float32 and out.logits.shape == (5, 3)
    torch.testing.assert_close(out.logits.double(), expected, rtol=1e-4, atol=1e-4)
    # the feature is encode_image's output before normalisation
    torch.testing.assert_close(out.features["embedding"].double(), img, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())


def test_default_template_and_class_checks(tiny):
    model, tok = tiny
    a = ClipTeacher.zero_shot(model, tok, CLASSES)
    b = ClipTeacher.zero_shot(model, tok, CLASSES, ["a photo of a {}."])
    torch.testing.assert_close(a.class_weights, b.class_weights)
    with pytest.raises(KDError, match="empty"):
        ClipTeacher.zero_shot(model, tok, [])
    with pytest.raises(KDError, match="duplicates.*'cat'"):
        ClipTeacher.zero_shot(model, tok, ["cat", "dog", "cat"])
    with pytest.raises(KDError, match="duplicates"):
        ClipTeacher.linear_probe(model, ["a", "a"])
    with pytest.raises(KDError, match="template"):
        ClipTeacher.zero_shot(model, tok, CLASSES, ["no placeholder"])
    with pytest.raises(KDError, match="'embedding'"):
        a.request_features(["visual.transformer"])


def test_input_transform_resizes_and_renormalises(tiny):
    model, tok = tiny
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    prep = ClipInput.from_model(model, student_mean=mean, student_std=std)
    assert prep.size == (32, 32)
    img = torch.rand(2, 3, 16, 16)  # the student's view in [0, 1], 16 px
    student_x = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = F.interpolate(img, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    expected = (expected - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(prep(student_x), expected, rtol=1e-5, atol=1e-5)
    teacher = ClipTeacher.zero_shot(model, tok, CLASSES, preprocess=prep)
    torch.testing.assert_close(
        teacher(student_x).logits, teacher.head(model.encode_image(expected))
    )


def _toy(n: int, seed: int) -> ArrayDataset:
    """Three classes told apart by which colour channel is bright: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    images[torch.arange(n), labels] += 180
    return ArrayDataset(images, labels, CLASSES)


def test_fit_probe_raises_accuracy_and_round_trips(tiny, tmp_path):
    model, tok = tiny
    train, test = _toy(60, 1), _toy(60, 2)
    teacher = ClipTeacher.zero_shot(model, tok, CLASSES)

    def accuracy(t: ClipTeacher) -> float:
        emb, labels = embed(t, test)
        return float((t.head(emb).argmax(1) == labels).float().mean())

    before = accuracy(teacher)
    history = fit_probe(teacher, train, epochs=30, lr=0.05, val=test)
    after = accuracy(teacher)
    assert after >= 0.95 > before
    assert history[-1]["val_top1"] == pytest.approx(100 * after)

    path = teacher.save_probe(tmp_path / "probe.pt")
    loaded = ClipTeacher.linear_probe(model, probe=path)
    assert loaded.class_names == tuple(CLASSES)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x).logits, teacher(x).logits)
    with pytest.raises(KDError, match="fitted for classes"):
        ClipTeacher.linear_probe(model, ["a", "b", "c"], probe=path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.visual.conv1.weight.add_(1.0)
    with pytest.raises(KDError, match="another image encoder"):
        ClipTeacher.linear_probe(other, probe=path)
    with pytest.raises(KDError, match="no classifier"):
        ClipTeacher.linear_probe(model, CLASSES)(x)


class TinyStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@pytest.mark.parametrize("loss", [FeatureMSE(), CosineEmbedding()], ids=["mse", "cosine"])
def test_embedding_pair_trains_through_trainer(tiny, loss):
    model, tok = tiny
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    teacher = ClipTeacher.zero_shot(
        model, tok, CLASSES, preprocess=ClipInput.from_model(model, mean, std)
    )
    data = _toy(64, 3).without_labels()  # 16 px student views, 32 px teacher input
    data = ArrayDataset(data.images[:, :, :16, :16].contiguous(), data.labels)
    torch.manual_seed(0)
    student = TinyStudent()
    if isinstance(loss, CosineEmbedding):
        student.fc = nn.Linear(8, 16)  # the student's fc outputs the embedding itself
    distiller = Distiller(student, teacher, {("fc", "embedding"): loss})
    trainer = Trainer(
        distiller,
        FastLoader(data, 16, seed=0),
        optimizer=torch.optim.Adam(distiller.parameters(), lr=3e-2),
        epochs=6,
        inputs=InputPipeline(None, mean, std),
        device="cpu",
        progress=False,
    )
    history = trainer.fit()
    key = "loss_fc<-embedding"
    assert history[-1][key] < 0.7 * history[0][key]


def test_from_pretrained_local_file_and_config(tiny, tmp_path):
    model, tok = tiny
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    mean, std = (0.5,) * 3, (0.25,) * 3
    teacher = ClipTeacher.from_pretrained(
        TINY, weights, CLASSES, student_mean=mean, student_std=std
    )
    direct = ClipTeacher.zero_shot(
        model, tok, CLASSES, preprocess=ClipInput.from_model(model, mean, std)
    )
    x = torch.randn(3, 3, 24, 24)
    torch.testing.assert_close(teacher(x).logits, direct(x).logits)
    cfg = clip_teacher_from_config(
        f"open_clip:{TINY}",
        str(weights),
        {"classes": CLASSES, "templates": None},
        None,
        {},
        student_mean=mean,
        student_std=std,
    )
    torch.testing.assert_close(cfg(x).logits, direct(x).logits)
    with pytest.raises(KDError, match="did you mean 'classes'"):
        clip_teacher_from_config(f"open_clip:{TINY}", str(weights), {"clases": CLASSES}, None, {})
    with pytest.raises(KDError, match="zero_shot"):
        clip_teacher_from_config(f"open_clip:{TINY}", str(weights), None, None, {})
    with pytest.raises(KDError, match="open_clip tag"):
        clip_teacher_from_config(f"open_clip:{TINY}", True, {"classes": CLASSES}, None, {})
    with pytest.raises(KDError, match="no CLIP weights file"):
        ClipTeacher.from_pretrained(TINY, tmp_path / "missing.pt", CLASSES)


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now fails
    with pytest.raises(KDError, match=r"pip install 'kdkit\[clip\]'"):
        ClipTeacher.from_pretrained("ViT-B-32", None, CLASSES)


def test_stl10_recipe_validates_and_builds_its_teacher(tiny, tmp_path):
    from pathlib import Path

    from kdkit.config import load_config
    from kdkit.run.models import build_teacher

    recipe = Path(__file__).parents[1] / "configs" / "stl10_clip_resnet18.yaml"
    cfg = load_config(recipe, check_paths=False)
    assert cfg.teacher.model == "open_clip:ViT-B-32"
    assert len(cfg.teacher.zero_shot.classes) == 10 and cfg.data.image_size == 96
    # the same section, pointed at the tiny model and a local weights file, builds a teacher
    weights = tmp_path / "tiny.pt"
    torch.save(tiny[0].state_dict(), weights)
    cfg = load_config(
        recipe,
        [
            f"teacher.model=open_clip:{TINY}",
            f"teacher.pretrained={weights}",
            "teacher.precision=fp32",
        ],
        check_paths=False,
    )
    teacher = build_teacher(cfg.teacher, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert isinstance(teacher, ClipTeacher) and teacher.class_names[0] == "airplane"
    out = teacher(torch.randn(2, 3, 96, 96))  # a 96 px student view, resized to 32 px inside
    assert out.logits.shape == (2, 10) and out.features["embedding"].shape == (2, 16)


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tiny):
    model, tok = tiny
    prep = ClipInput.from_model(model, (0.5,) * 3, (0.25,) * 3)
    cpu = ClipTeacher.zero_shot(model, tok, CLASSES, preprocess=prep)
    gpu = ClipTeacher.zero_shot(
        copy.deepcopy(model), tok, CLASSES, preprocess=prep, precision="bf16"
    ).to("cuda")
    x = torch.randn(8, 3, 16, 16)
    out = gpu(x.to("cuda"))
    assert out.logits.device.type == "cuda" and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.cpu(), cpu(x).logits, rtol=0.05, atol=0.1)


def test_probe_training_moved_to_run_and_the_old_names_say_where(tiny):
    import kdkit.teachers.clip_teacher as old

    model, tok = tiny
    with pytest.raises(KDError, match="kdkit.run.clip_probe.fit_probe"):
        old.fit_probe  # noqa: B018
    teacher = ClipTeacher.linear_probe(model, CLASSES)
    with pytest.raises(KDError, match="kdkit.run.clip_probe.fit_probe"):
        teacher.fit_probe(_toy(12, 3), epochs=1)
    with pytest.raises(AttributeError, match="no attribute 'fit_prob'"):
        old.fit_prob  # noqa: B018
    src = open(old.__file__).read() + open(sys.modules["kdkit.teachers.clip_probe"].__file__).read()
    assert (
        "kdkit.train" not in src
        and "kdkit.distiller" not in src
        and "kdkit.run" not in src.replace("kdkit.run.clip_probe", "")
    )


def test_embedding_student_gets_no_cross_entropy_and_a_meaningful_best_metric(tiny, tmp_path):
    """The Jetson tutorial's embedding run: resnet18(num_classes=512) learns the teacher's
    embedding. Its output has D dims, not C classes: no CE on it; epochs are ranked by the
    teacher's head on the student's embedding, or by the pair's val loss without a head."""
    model, tok = tiny
    teacher = ClipTeacher.zero_shot(model, tok, CLASSES)
    student = TinyStudent()
    student.fc = nn.Linear(8, 16)  # outputs the 16-d embedding
    d = Distiller(student, teacher, {("fc", "embedding"): CosineEmbedding()})
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    out = d.step(x, y)
    assert "student" not in out.components  # no CE over the 16 embedding dims
    assert d.best_metric == ("top1", True)
    train, val = _toy(24, 1), _toy(12, 2)
    trainer = Trainer(
        d, FastLoader(train, 12), FastLoader(val, 12, shuffle=False), epochs=1,
        device="cpu", progress=False, checkpoint_dir=tmp_path / "run",
    )  # fmt: skip
    row = trainer.fit()[0]
    assert {"val_top1", "val_pair_loss"} <= set(row) and (tmp_path / "run" / "best.pt").is_file()
    with torch.no_grad():  # val top-1 is the zero-shot head on the student's embedding
        emb = student.eval()(val.images.float() / 255)
        want = 100 * float((teacher.head(emb).argmax(1) == val.labels).float().mean())
    assert row["val_top1"] == pytest.approx(want)
    # a teacher feature without a head: the pair's own val loss, lower is better
    plain = Distiller(TinyStudent(), TinyStudent(), {("fc", "body.0"): FeatureMSE()})
    assert plain.best_metric == ("pair_loss", False)


def test_probe_fitted_on_the_fp32_encoder_loads_for_a_bf16_teacher(tiny, tmp_path):
    model, tok = tiny
    fp32 = ClipTeacher.zero_shot(model, tok, CLASSES)
    fit_probe(fp32, _toy(30, 1), epochs=2, lr=0.05)
    path = fp32.save_probe(tmp_path / "probe.pt")
    bf16 = ClipTeacher.linear_probe(copy.deepcopy(model), probe=path, precision="bf16")
    assert bf16.precision == "bf16" and bf16.encoder_fingerprint() == fp32.encoder_fingerprint()
    assert bf16.fingerprint() != fp32.fingerprint()  # caches still tell the two apart
