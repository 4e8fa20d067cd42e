"""The served teacher (``kdkit lm serve``, kdkit.lm.serve): exactly the in-process teacher's
targets and loss, vLLM's protocol equal to kdkit's with the bucket tail, batched requests, and
the checks on both sides of the wire. A real server (uvicorn in a thread) on 127.0.0.1."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import torch
from _lm_fixtures import PARAGRAPH, VOCAB, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401
from _served import server_thread, tiny_scorer

from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.serve.client import ServedTeacher
from kdkit.lm.task import LMTask
from kdkit.lm.topk import teacher_topk


class _Data:
    max_length, pack = 64, True


@pytest.fixture(scope="module")
def served(lm_tokenizer):  # noqa: F811
    teacher = tiny_llama(seed=1)
    with server_thread(tiny_scorer(teacher, lm_tokenizer), name="tiny") as (url, app):
        yield url, teacher, app


def _batch(tokenizer):
    ids = tokenizer(PARAGRAPH)["input_ids"][:40]
    rows = [
        TokenRow.of(ids),
        TokenRow.of(ids[:20], [False] * 8 + [True] * 12),  # a prompt, then a completion
        TokenRow.of(ids[:30], doc_ids=[0] * 12 + [1] * 18),  # packed: two documents
    ]
    return Aligner(pad_id=tokenizer.pad_token_id, max_length=64)(rows)


def _client(url, tokenizer, **kwargs):
    teacher = ServedTeacher(url, **kwargs)
    teacher.check_run(_Data, tokenizer, VOCAB)
    return teacher


def _loss_and_grads(teacher, batch, **kwargs):
    torch.manual_seed(0)
    student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
    task = LMTask(student, teacher, probe=False, **kwargs)
    out = task.step(batch)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_served_loss_and_grads_are_in_process_ones(served, lm_tokenizer, divergence):  # noqa: F811
    url, teacher, _ = served
    batch = _batch(lm_tokenizer)
    client = _client(url, lm_tokenizer, topk=VOCAB, temperature=2.0, tail="bucket")
    target = client.target_of(batch)
    ref = teacher_topk(teacher, batch, VOCAB, VOCAB, 2.0, mass=False)
    assert torch.equal(target.ids, ref.ids) and torch.equal(target.logp, ref.logp)
    live = _loss_and_grads(copy.deepcopy(teacher), batch, temperature=2.0, divergence=divergence)
    remote = _loss_and_grads(client, batch, temperature=2.0, divergence=divergence)
    assert remote[0] == pytest.approx(live[0], rel=1e-5)
    for name, grad in live[1].items():
        torch.testing.assert_close(remote[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    client.close()


def test_vllm_protocol_gives_the_native_targets_bucket_tail(served, lm_tokenizer):  # noqa: F811
    url, _, _ = served
    batch = _batch(lm_tokenizer)
    native = _client(url, lm_tokenizer, topk=8)
    vllm = _client(url, lm_tokenizer, topk=8, protocol="vllm")
    a, b = native.target_of(batch), vllm.target_of(batch)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp)
    torch.testing.assert_close(a.tail, b.tail, rtol=0, atol=1e-6)
    assert _loss_and_grads(native, batch)[0] == pytest.approx(_loss_and_grads(vllm, batch)[0])
    # vLLM's prompt log-probs are at T = 1: another KD temperature is exact only with renorm
    with pytest.raises(KDError, match="renorm"):
        ServedTeacher(url, protocol="vllm", temperature=2.0)
    native.close(), vllm.close()


def test_vllm_field_names_and_limits(served):
    url, _, _ = served
    body = {"model": "tiny", "prompt": [[5, 6, 7, 8], [9, 10]], "max_tokens": 1,
            "prompt_logprobs": 3}  # fmt: skip
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and choice["index"] == 0
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 4
    assert "6" in plp[1] and {"logprob", "rank", "decoded_token"} == set(plp[1]["6"])
    assert sorted(v["rank"] for k, v in plp[1].items() if k != "6")[:3] == [1, 2, 3]
    too_many = httpx.post(f"{url}/v1/completions", json={**body, "prompt_logprobs": 50}, timeout=30)
    assert too_many.status_code == 400
    assert "Requested prompt logprobs of 50, which is greater than max allowed: 20" in too_many.text
    text = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "hello"}, timeout=30)
    assert text.status_code == 400 and "token-id prompts" in text.text
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert models["id"] == "tiny" and models["max_model_len"] == 64


def test_concurrent_requests_share_teacher_batches(lm_tokenizer):  # noqa: F811
    scorer = tiny_scorer(tiny_llama(seed=1), lm_tokenizer)
    score = scorer.score

    def slow(*args, **kwargs):  # every forward takes a while: requests pile up meanwhile
        time.sleep(0.3)
        return score(*args, **kwargs)

    scorer.score = slow
    batch = _batch(lm_tokenizer)
    with server_thread(scorer) as (url, app):
        clients = [_client(url, lm_tokenizer, topk=4) for _ in range(6)]
        results = [None] * 6

        def ask(i):
            results[i] = clients[i].target_of(batch)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        stats = httpx.get(f"{url}/kdkit/v1/info", timeout=30).json()["stats"]
        [c.close() for c in clients]
    assert stats["requests"] == 6 and stats["forwards"] < 6  # merged into shared forwards
    for r in results[1:]:
        assert torch.equal(r.ids, results[0].ids)
        torch.testing.assert_close(r.logp, results[0].logp)


def test_a_teacher_with_another_tokenizer_is_refused_at_start(served, lm_tokenizer):  # noqa: F811
    url, _, _ = served
    other = copy.deepcopy(lm_tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(KDError, match="another tokenizer .*chat_template"):
        ServedTeacher(url).check_run(_Data, other, VOCAB)
    with pytest.raises(KDError, match="head has 100 rows"):
        ServedTeacher(url).check_run(_Data, lm_tokenizer, 100)


def test_the_server_checks_what_it_is_sent(lm_tokenizer):  # noqa: F811
    from kdkit.lm.serve.server import check_exposure
    from kdkit.lm.serve.wire import encode_rows

    with server_thread(tiny_scorer(tiny_llama(), lm_tokenizer), token="s3cret",
                       max_body_bytes=4096) as (url, _):  # fmt: skip
        topk = f"{url}/kdkit/v1/topk"
        assert httpx.post(topk, content=b"x", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(topk, content=b"\0" * 20, headers=auth, timeout=30).status_code == 400
        huge = httpx.post(topk, content=b"\0" * 5000, headers=auth, timeout=30)
        assert huge.status_code == 413
        out_of_range = encode_rows([TokenRow.of([1, 2, 10_000])], topk=4, temperature=1.0,
                                   mass=False)  # fmt: skip
        bad = httpx.post(topk, content=out_of_range, headers=auth, timeout=30)
        assert bad.status_code == 400 and "token ids outside" in bad.text
        with pytest.raises(KDError, match="refused this client .*KDKIT_TEACHER_TOKEN"):
            ServedTeacher(url)
        assert ServedTeacher(url, token="s3cret").info.vocab == VOCAB
    with pytest.raises(KDError, match="beyond this machine: set a shared token"):
        check_exposure("0.0.0.0", None, "KDKIT_TEACHER_TOKEN")
    check_exposure("127.0.0.1", None, "KDKIT_TEACHER_TOKEN")
    check_exposure("0.0.0.0", "t", "KDKIT_TEACHER_TOKEN")


def _tampered(top, **change):
    """A response body of ``top`` with its arrays changed (what a broken server could send)."""
    from safetensors.numpy import save

    arrays = {"ids": top.ids.int().numpy(), "logp": top.logp.numpy(), "tail": top.tail.numpy()}
    meta = {"format": "kdkit-served-topk", "version": "1", "fingerprint": "f" * 64,
            "topk": "4", "temperature": "1.0"}  # fmt: skip
    for key, value in change.items():
        if key in meta:
            meta[key] = value
        else:
            arrays[key] = value(arrays[key].copy())
    return save(arrays, metadata=meta)


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ids": lambda a: a[:-1]}, "shapes"),
        ({"ids": _set((0, 0), VOCAB)}, "outside"),
        ({"ids": _set((0, 1), -1)}, "outside"),
        ({"ids": lambda a: _set((0, 1), a[0, 0])(a)}, "repeats"),
        ({"logp": _set((0, 0), float("nan"))}, "non-finite"),
        ({"logp": _set((1, 2), float("inf"))}, "non-finite"),
        ({"tail": _set(0, float("nan"))}, "non-finite"),
        ({"logp": lambda a: a[:, ::-1].copy()}, "decreasing"),
        ({"logp": lambda a: a - 1.0}, "not 1"),
        ({"fingerprint": "e" * 64}, "changed mid-run"),
        ({"topk": "5"}, "asked"),
        ({"version": "2"}, "version"),
    ],
)
def test_a_wrong_response_is_refused(lm_tokenizer, change, message):  # noqa: F811
    from kdkit.lm.serve.wire import decode_topk

    batch = _batch(lm_tokenizer)
    top = teacher_topk(tiny_llama(seed=1), batch, VOCAB, 4, 1.0, mass=False)
    kwargs = dict(entries=batch.n_tokens, topk=4, vocab=VOCAB, temperature=1.0,
                  fingerprint="f" * 64)  # fmt: skip
    decode_topk(_tampered(top), **kwargs)  # the untouched body is accepted
    with pytest.raises(KDError, match=message):
        decode_topk(_tampered(top, **change), **kwargs)


def test_a_server_answering_nonsense_is_never_trained_on(lm_tokenizer):  # noqa: F811
    """A server whose answer breaks the protocol stops the step before the student moves."""
    scorer = tiny_scorer(tiny_llama(seed=1), lm_tokenizer)
    score = scorer.score

    def poisoned(*args, **kwargs):
        top, counts = score(*args, **kwargs)
        logp = top.logp.clone()
        logp[0, 0] = float("nan")
        return type(top)(top.ids, logp, top.tail, top.mass), counts

    scorer.score = poisoned
    batch = _batch(lm_tokenizer)
    with server_thread(scorer) as (url, _):
        client = _client(url, lm_tokenizer, topk=4)
        student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
        before = copy.deepcopy(student.state_dict())
        task = LMTask(student, client, probe=False)
        with pytest.raises(KDError, match="non-finite"):
            task.step(batch)
        client.close()
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_slow_server_pauses_the_client_which_retries(lm_tokenizer, caplog):  # noqa: F811
    scorer = tiny_scorer(tiny_llama(seed=1), lm_tokenizer)
    score, calls = scorer.score, []

    def first_slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)  # longer than the client's timeout
        return score(*args, **kwargs)

    scorer.score = first_slow
    batch = _batch(lm_tokenizer)
    with server_thread(scorer) as (url, _):
        client = _client(url, lm_tokenizer, topk=4, timeout_s=0.5, retry_s=30)
        with caplog.at_level("WARNING", logger="kdkit.lm.serve.client"):
            target = client.target_of(batch)
        client.close()
    assert target.shape == (batch.n_tokens,)
    said = caplog.text
    assert "does not answer (no answer within 0.5 s): the run is paused" in said
    assert "answers again after" in said


def test_the_onnx_runtime_teacher_is_served_as_the_eager_one(lm_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """``kdkit lm serve hf:DIR --backend onnx``: the same weights (the same ``weights_sha256``),
    another engine (another fingerprint), the eager teacher's top k to float tolerance."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from kdkit.run.lm_serve import load_served

    monkeypatch.setenv("HOME", str(tmp_path))  # the export lands in ~/.cache/kdkit/onnx
    folder = tmp_path / "teacher"
    tiny_llama(seed=1).save_pretrained(folder)
    lm_tokenizer.save_pretrained(folder)
    eager = load_served(f"hf:{folder}")
    onnx = load_served(f"hf:{folder}", backend="onnx")
    assert onnx.info["teacher"]["engine"] == "onnx fp32"
    assert onnx.info["teacher"]["weights_sha256"] == eager.info["teacher"]["weights_sha256"]
    assert onnx.fingerprint != eager.fingerprint  # a client pinned to one refuses the other
    batch = _batch(lm_tokenizer)
    with server_thread(onnx) as (url, _):
        client = _client(url, lm_tokenizer, topk=8, temperature=2.0)
        got = client.target_of(batch)
        client.close()
    ref = teacher_topk(eager.teacher, batch, VOCAB, 8, 2.0, mass=False)
    assert torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.logp, ref.logp, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.tail, ref.tail, rtol=0, atol=1e-4)
