"""Hostile served teachers (issue 36): ``teacher: {model: "http://..."}`` configs that cannot
work (no port, a path, keys that belong where the teacher runs, a tail it cannot give, vLLM at
another temperature), a server that is not there or is not kdkit's, and ``kdkit lm serve``
asked to expose itself without a token or on a port it cannot have: each one line, before any
work. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from _hostile import Case, Fx, cli_rows, judge_row, params

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(name: str, teacher: dict, **sections):
    def argv(fx: Fx) -> list:
        return ["train", fx.lm.write(name, teacher=teacher, **sections)]

    return argv


def _nobody_there(fx: Fx) -> list:
    url = f"http://127.0.0.1:{_free_port()}"
    return _train("served-nobody", {"model": url, "served": {"retry_s": 0}})(fx)


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_error(404)

    def log_message(self, *args):
        pass


def _not_kdkit(fx: Fx) -> list:
    """Any web server that answers 404 (here the standard library's)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return _train("served-not-kdkit", {"model": url})(fx)


def _port_taken(fx: Fx) -> list:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    fx.held = sock  # kept open while the row runs
    return ["lm", "serve", f"hf:{fx.lm.teacher}", "--port", sock.getsockname()[1]]


URL = "http://127.0.0.1:9"
CASES: list[Case] = cli_rows([
    Case("served-url-without-port", _train("s1", {"model": "http://127.0.0.1"}), "HOST:PORT"),
    Case("served-url-with-path", _train("s2", {"model": f"{URL}/v1"}), "no path"),
    Case("served-url-with-user", _train("s3", {"model": "http://me:pw@127.0.0.1:9"}), "no path, user"),
    Case("served-with-backend", _train("s4", {"model": URL, "backend": "onnx"}), "chosen where it runs"),
    Case("served-with-tokenizer", _train("s5", {"model": URL, "tokenizer": "/tmp"}), "chosen where it runs"),
    Case("served-section-on-local-teacher", lambda fx: _train("s6", {"model": f"hf:{fx.lm.teacher}", "served": {"topk": 4}})(fx), "teacher.served.*served teacher"),
    Case("served-tail-prior", _train("s7", {"model": URL}, distill={"tail": "prior"}), "prior"),
    Case("served-tail-label", _train("s14", {"model": URL}, distill={"tail": "label"}), "'label' reads the text"),
    Case("served-vllm-at-t2-bucket", _train("s8", {"model": URL, "served": {"protocol": "vllm"}}, distill={"temperature": 2.0}), "renorm"),
    Case("served-topk-zero", _train("s9", {"model": URL, "served": {"topk": 0}}), "teacher.served.topk"),
    Case("served-token-env-not-a-name", _train("s10", {"model": URL, "served": {"token_env": "1 X"}}), "token_env"),
    Case("served-protocol-unknown", _train("s11", {"model": URL, "served": {"protocol": "grpc"}}), "protocol"),
    Case("served-student-served", _train("s12", {"model": URL}, student={"model": URL}), "only the teacher can be served"),
    Case("served-nobody-listening", _nobody_there, "did not answer for 0 s"),
    Case("served-not-a-kdkit-server", _not_kdkit, "not kdkit lm serve.*protocol: vllm"),
    Case("serve-beyond-loopback-without-token", lambda fx: ["lm", "serve", f"hf:{fx.lm.teacher}", "--host", "0.0.0.0"], "shared token"),
    Case("serve-port-out-of-range", lambda fx: ["lm", "serve", f"hf:{fx.lm.teacher}", "--port", "70000"], "--port"),
    Case("serve-a-cache-config", lambda fx: ["lm", "serve", fx.lm.write("s13", teacher={"model": f"cache:{fx.lm.cache}"})], "hf:DIR"),
    Case("serve-port-taken", _port_taken, "cannot listen on 127.0.0.1"),
])  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_served(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
