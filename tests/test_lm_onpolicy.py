"""On-policy distillation (GKD, ``distill.on_policy``): with ``lambda: 1`` the loss sees the
student's own samples (the same ones Hugging Face ``generate`` draws under the same seed), the
step is deterministic under a seed, sampling stops at EOS and at ``max_new_tokens``,
``lambda: 0`` changes nothing, and bad configs are one-line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main
from kdkit.errors import KDError
from kdkit.lm import Aligner, LMTask, OnPolicy, TokenRow, load_lm_dataset
from kdkit.lm.onpolicy import turn_end_id

MAX_LENGTH = 48


def _pairs(n: int = 40) -> list[dict[str, str]]:
    """Prompt = first half of a line of textwrap.py, completion = the second half."""
    lines = [x.strip() for x in Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()]
    lines = [x for x in lines if len(x) >= 24][:n]
    return [{"prompt": x[: len(x) // 2], "completion": x[len(x) // 2 :]} for x in lines]


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pc") / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    return path


@pytest.fixture(scope="module")
def rows(pc_file, lm_tokenizer):  # noqa: F811
    data = load_lm_dataset(
        [str(pc_file)],
        lm_tokenizer,
        format="prompt_completion",
        loss_on="completion",
        max_length=MAX_LENGTH,
        pack=False,
    )
    return data.rows


def _student(**kw):
    return tiny_llama(seed=2, hidden_size=16, intermediate_size=32, **kw).train()


def _prompt_len(row: TokenRow) -> int:
    return int(row.trainable.int().argmax())


def test_lambda_one_scores_the_students_own_samples(rows, lm_tokenizer, monkeypatch):  # noqa: F811
    eos, pad = lm_tokenizer.eos_token_id, 0
    aligner = Aligner(pad_id=pad, max_length=MAX_LENGTH)
    batch = aligner(rows[:4])
    student = _student()
    op = OnPolicy(1.0, max_new_tokens=10, temperature=0.9, eos_token_id=eos, aligner=aligner)
    torch.manual_seed(7)
    new = op(student, batch)
    assert student.training  # train mode restored after sampling in eval mode

    # the same draws as Hugging Face generate (pure sampling: top_k 0, top_p 1), same seed
    prompts = [r.input_ids[: _prompt_len(r)] for r in rows[:4]]
    width = max(len(p) for p in prompts)
    ids = torch.full((4, width), pad)
    attention = torch.zeros((4, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], attention[i, width - len(p) :] = p, 1
    torch.manual_seed(7)
    ref = student.eval().generate(
        input_ids=ids,
        attention_mask=attention,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=0.9,
        max_new_tokens=10,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, width:]
    student.train()
    for i, p in enumerate(prompts):
        gen = ref[i].tolist()
        gen = gen[: gen.index(eos) + 1] if eos in gen else gen
        n, k = len(p), len(gen)
        assert new.input_ids[i, : n + k].tolist() == p.tolist() + gen
        # trained: exactly the generated tokens (EOS included); the prompt and padding masked
        expect = torch.zeros(new.mask.shape[1], dtype=torch.bool)
        expect[n - 1 : n + k - 1] = True
        assert torch.equal(new.mask[i], expect), i
        assert new.labels[i, n - 1 : n + k - 1].tolist() == gen
    assert new.n_tokens == int(new.mask.sum())
    assert not torch.equal(new.input_ids[:, : batch.input_ids.shape[1]], batch.input_ids)

    # through LMTask.step: the loss sees the sampled batch
    seen = []
    forward = LMTask.forward
    monkeypatch.setattr(
        LMTask, "forward", lambda self, b, **k: (seen.append(b), forward(self, b, **k))[1]
    )
    task = LMTask(student, tiny_llama(seed=1), on_policy=op)
    torch.manual_seed(7)
    out = task.step(batch)
    assert torch.equal(seen[0].input_ids, new.input_ids) and torch.equal(seen[0].mask, new.mask)
    assert out.normalizer == new.n_tokens
    task.evaluate([batch])  # evaluation scores the data's own completions
    assert torch.equal(seen[-1].input_ids, batch.input_ids)


def _train(rows, lam: float, seed: int, steps: int = 3):
    torch.manual_seed(seed)
    aligner = Aligner(pad_id=0, max_length=MAX_LENGTH)
    op = OnPolicy(lam, max_new_tokens=6, temperature=1.0, aligner=aligner)
    task = LMTask(_student(), tiny_llama(seed=1), on_policy=op, ce_weight=0.1)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        out = task.step(aligner(rows[4 * i : 4 * i + 4]))
        (out.loss / out.normalizer).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses, {k: v.clone() for k, v in task.student.state_dict().items()}


def test_the_step_is_deterministic_under_a_seed(rows):
    a_loss, a_w = _train(rows, 0.5, seed=3)
    b_loss, b_w = _train(rows, 0.5, seed=3)
    assert a_loss == b_loss
    for k, v in a_w.items():
        assert torch.equal(v, b_w[k]), k
    off_loss, _ = _train(rows, 0.0, seed=3)
    assert off_loss != a_loss  # some of those batches were the student's samples


def _biased(eos: int, bias: float):
    """A student whose head adds ``bias`` to the EOS logit (always / never stops)."""
    student = _student()
    add = torch.zeros(student.config.vocab_size)
    add[eos] = bias
    student.lm_head.register_forward_hook(lambda m, i, o: o + add)
    return student


def test_sampling_stops_at_eos_and_at_max_new_tokens(rows, lm_tokenizer):  # noqa: F811
    eos = lm_tokenizer.eos_token_id
    aligner = Aligner(pad_id=0, max_length=MAX_LENGTH)
    batch = aligner(rows[:4])
    prompts = [_prompt_len(r) for r in rows[:4]]
    stop = OnPolicy(1.0, max_new_tokens=20, eos_token_id=eos, aligner=aligner)
    new = stop(_biased(eos, 1e4), batch)
    assert new.mask.sum(1).tolist() == [1] * 4  # one sampled token each: the EOS
    assert new.labels[new.mask].tolist() == [eos] * 4
    assert [int(x) for x in new.mask.int().argmax(1)] == [p - 1 for p in prompts]
    assert new.input_ids.shape[1] == max(prompts) + 1

    never = _biased(eos, -1e4)
    new = OnPolicy(1.0, max_new_tokens=5, eos_token_id=eos, aligner=aligner)(never, batch)
    assert new.mask.sum(1).tolist() == [5] * 4 and eos not in new.labels[new.mask].tolist()
    # the aligner's max_length caps a completion too
    short = Aligner(pad_id=0, max_length=max(prompts) + 2)
    new = OnPolicy(1.0, max_new_tokens=5, eos_token_id=eos, aligner=short)(never, batch)
    assert new.input_ids.shape[1] <= short.max_length
    assert new.mask.sum(1).tolist() == [min(5, short.max_length - p) for p in prompts]


def test_chat_prompts_end_before_the_first_assistant_turn(rows, lm_tokenizer, tmp_path):  # noqa
    chats = [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["completion"]},
            ]
        }
        for p in _pairs(6)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    chat = load_lm_dataset(
        [str(path)],
        lm_tokenizer,
        format="chat",
        loss_on="assistant",
        max_length=MAX_LENGTH,
        pack=False,
        truncation="right",  # rows cut at max_length: turn_end_id must not count their ends
    ).rows
    end = lm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_id(chat, MAX_LENGTH) == end  # ChatML closes a turn with <|im_end|>, not EOS
    assert turn_end_id(rows, MAX_LENGTH) == lm_tokenizer.eos_token_id
    aligner = Aligner(pad_id=0, max_length=MAX_LENGTH)
    new = OnPolicy(1.0, max_new_tokens=20, eos_token_id=end, aligner=aligner)(
        _biased(end, 1e4), aligner(chat[:3])
    )
    header = lm_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for i, r in enumerate(chat[:3]):
        n = _prompt_len(r)
        assert r.input_ids[n - len(header) : n].tolist() == header  # the prompt asks for a reply
        assert new.input_ids[i, : n + 1].tolist() == r.input_ids[:n].tolist() + [end]
        assert int(new.mask[i].sum()) == 1


def test_lambda_zero_leaves_the_batch_and_the_rng_unchanged(rows):
    batch = Aligner(pad_id=0, max_length=MAX_LENGTH)(rows[:4])
    student = _student()
    state = torch.get_rng_state()
    assert OnPolicy(0.0)(student, batch) is batch
    assert torch.equal(torch.get_rng_state(), state)


def test_packed_or_promptless_rows_are_one_line_errors(rows):
    aligner = Aligner(pad_id=0, max_length=MAX_LENGTH)
    a, b = rows[0], rows[1]
    packed = TokenRow(
        torch.cat([a.input_ids, b.input_ids])[:MAX_LENGTH],
        torch.cat([a.trainable, b.trainable])[:MAX_LENGTH],
        torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).long()[:MAX_LENGTH],
    )
    op = OnPolicy(1.0, max_new_tokens=4)
    with pytest.raises(KDError, match="data.pack: false"):
        op(_student(), aligner([packed]))
    untrained = TokenRow.of(a.input_ids.tolist(), [False] * len(a))
    with pytest.raises(KDError, match="prompt_completion or chat"):
        op(_student(), aligner([a, untrained]))
    for bad in ({"lam": 1.5}, {"lam": 0.5, "max_new_tokens": 0}, {"lam": 1, "temperature": 0}):
        with pytest.raises(KDError):
            OnPolicy(**bad)


@pytest.fixture(scope="module")
def pc_run(tmp_path_factory, lm_tokenizer, pc_file):  # noqa: F811
    root = tmp_path_factory.mktemp("oprun")
    teacher_dir, student_dir = root / "teacher", root / "student"
    tiny_llama(seed=1).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    _student().config.save_pretrained(student_dir)
    lm_tokenizer.save_pretrained(student_dir)
    config = {
        "task": "lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {
            "text_files": [str(pc_file)],
            "val": {"split": 0.2},
            "format": "prompt_completion",
            "loss_on": "completion",
            "max_length": MAX_LENGTH,
            "pack": False,
            "batch_size": 8,
        },
        "distill": {"on_policy": {"lambda": 0.5, "max_new_tokens": 8, "temperature": 1.0}},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
    }
    return root, config


def test_kdkit_train_with_on_policy_end_to_end(pc_run, capsys):
    root, config = pc_run
    path = root / "op.yaml"
    path.write_text(yaml.safe_dump({**config, "run_dir": str(root / "run")}))
    assert main(["train", str(path), "--set", "distill.on_policy.lambda=1"]) == 0
    assert "best val perplexity" in capsys.readouterr().out
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["distill"]["on_policy"] == {"lambda": 1, "max_new_tokens": 8, "temperature": 1.0}
    assert main(["eval", str(root / "run"), "--json"]) == 0  # the saved config parses back


def test_bad_on_policy_configs_are_one_line_errors(pc_run, tmp_path, capsys):
    _, config = pc_run
    op = config["distill"]["on_policy"]
    data = config["data"]
    cases = {
        "lambda above 1": ({"distill": {"on_policy": {**op, "lambda": 1.5}}}, "lambda"),
        "no lambda": ({"distill": {"on_policy": {"max_new_tokens": 8}}}, "lambda"),
        "max_new_tokens 0": ({"distill": {"on_policy": {**op, "max_new_tokens": 0}}}, "max_new"),
        "temperature 0": ({"distill": {"on_policy": {**op, "temperature": 0}}}, "temperature"),
        "cached teacher": ({"teacher": {"model": f"cache:{tmp_path}"}}, "cache"),
        "no teacher": ({"teacher": None}, "teacher"),
        "format text": ({"data": {**data, "format": "text", "loss_on": "all"}}, "format"),
        "loss_on all": ({"data": {**data, "loss_on": "all"}}, "loss_on completion"),
        "packed": ({"data": {**data, "pack": True}}, "data.pack: false"),
        "fsdp": ({"train": {**config["train"], "fsdp": True}}, "fsdp"),
    }
    capsys.readouterr()
    for name, (change, word) in cases.items():
        run_dir = tmp_path / name.replace(" ", "-")
        (tmp_path / "bad.yaml").write_text(
            yaml.safe_dump({**config, **change, "run_dir": str(run_dir)})
        )
        assert main(["train", str(tmp_path / "bad.yaml")]) == 2, name
        said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdkit")]
        assert len(said) == 1 and said[0].startswith("kdkit: error:"), (name, said)
        assert word in said[0], (name, said)
        assert not run_dir.exists(), name
