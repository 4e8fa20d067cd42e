"""A served teacher (``kdkit lm serve``) against the in-process teacher and the top-k cache.

One machine, two cores: the teacher is served on core 1 (``kdkit lm serve --threads 1``, its
process pinned there), the student trains on core 0 (pinned, one thread), over loopback.

1. Exactness. One batch of real rows through the student's fused loss with (a) the teacher in
   the process and (b) the same teacher served with top k = the whole vocabulary (``bucket``
   tail: then nothing is outside the top k), and (c) vLLM's protocol (``/v1/completions`` +
   ``prompt_logprobs``, answered by ``kdkit lm serve``) against (d) kdkit's protocol at the
   same k (20, vLLM's default ``--max-logprobs``) and T = 1: the largest relative difference
   of the loss and of the student's gradients.
2. Throughput (``--rounds`` rounds, the rows interleaved, each row a ``kdkit train`` of the
   same config but its teacher in a process of its own): tokens/s of the epochs after the
   first (the prefetch is warm), for the top-32 cache (q8, captured once before the rounds),
   the in-process teacher (eager PyTorch, on the student's core), the served teacher (eager
   PyTorch, top 32) and the served teacher run by ONNX Runtime (``--backend onnx``). Ratios
   to the cache-fed row of the same round; medians over rounds. Beside them, what each
   server delivers alone (batches back to back, no student): a served run trains at most at
   the slower of the student alone (the cache row) and its server alone. On a machine shared
   with other jobs the wall-clock rows favour the rows that use one core (the others' work
   moves to the core the server leaves), so each row also reports the training process's
   tokens per CPU second (its own threads, the client's included) and the share of its wall
   time its loop waited for served targets: together, what the row would do on idle cores.
3. Memory. The training process's peak RSS with a larger teacher (``--mem-hidden``,
   ``--mem-layers``) in the process and served: the served run must not hold its weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_served.py --rounds 3 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = str(HERE.parents[1])
ROWS = ("cache", "online", "served", "served-onnx")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < os.cpu_count():
        os.sched_setaffinity(0, {cpu})


def _peak_rss_mb(pid: str = "self") -> float:
    """The process's peak RSS (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: across
    ``exec`` Linux keeps the larger of it and the forking parent's, and the parent here held a
    teacher (measured: a served child "peaked" at the parent's 1.26 GB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _runqueue_s() -> float:
    """Seconds this thread has waited for a core while runnable (``/proc`` schedstat)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def child(config: str, cpu: int) -> None:
    """One ``kdkit train`` of ``config`` on core ``cpu``; prints its epochs' tokens/s, the CPU
    seconds the process used, the seconds its loop waited for served targets, and its RSS."""
    _pin(cpu)
    torch.set_num_threads(1)
    import kdkit.lm.serve.prefetch as prefetch
    from kdkit.config import load_resolved
    from kdkit.run.lm_job import build_lm_trainer

    waited: list[float] = []
    wait_for = prefetch.wait_for

    def timed(*args):  # the loop blocked on the served teacher (the prefetch was not enough)
        start = time.perf_counter()
        out = wait_for(*args)
        waited.append(time.perf_counter() - start)
        return out

    prefetch.wait_for = timed
    run_dir = Path(config).parent / "runs" / f"{Path(config).stem}-{time.time_ns()}"
    cfg = load_resolved(config, run_dir=str(run_dir))  # each round its own run directory
    trainer, _ = build_lm_trainer(cfg, torch.device("cpu"))
    start, cpu_start, queued = time.perf_counter(), time.process_time(), _runqueue_s()
    history = trainer.fit()
    print(json.dumps({
        "tok_per_s": [h["tok_per_s"] for h in history],
        "tokens": sum(h["tok_per_s"] * h["epoch_time_s"] for h in history),
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
        "wait_s": sum(waited),
        "runqueue_s": _runqueue_s() - queued,  # the training thread, runnable, not running
        "peak_rss_mb": _peak_rss_mb(),
    }))  # fmt: skip


def _run_child(config: Path, cpu: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(HERE), "--child", str(config), "--cpu", str(cpu)],
                         env=env, capture_output=True, text=True, timeout=3600)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Server:
    """``kdkit lm serve`` pinned to one core; its peak RSS read from /proc at the end."""

    def __init__(self, model: str, *args: str, cpu: int = 1) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "kdkit", "lm", "serve", model, "--port", "0",
               "--threads", "1", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: _pin(cpu))  # fmt: skip
        deadline = time.monotonic() + 300
        for line in self.proc.stdout:
            if "listening on" in line:
                self.url = line.split("listening on ")[1].split()[0]
                print(f"  {line.strip()}")
                return
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise SystemExit(f"kdkit lm serve {model} did not start")

    def peak_rss_mb(self) -> float:
        return _peak_rss_mb(str(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()  # a benchmark that fails leaves no server behind


def setup(root: Path, chars: int, vocab: int, length: int) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdkit.lm.tokenizer import train_bpe_tokenizer
    from kdkit.run.lm_demo import demo_corpus

    files, source = demo_corpus()
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="ignore") for f in files[:400])
    text = text[:chars]
    (root / "corpus.txt").write_text(text)
    (root / "small.txt").write_text(text[:3000])
    train_bpe_tokenizer([text], vocab, root / "tok")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    shapes = {
        "teacher": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4),
        "student": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2),
    }  # fmt: skip
    for name, shape in shapes.items():
        cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=length,
                          tie_word_embeddings=False, **shape)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        (model.save_pretrained if name == "teacher" else model.config.save_pretrained)(root / name)
        tok.save_pretrained(root / name)
    print(f"corpus: {source}, {len(text):,} characters; vocabulary {len(tok)}")
    return {"tok": tok}


def big_teacher(root: Path, hidden: int, layers: int, length: int) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=length,
                      tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "big")
    tok.save_pretrained(root / "big")
    return sum(p.numel() for p in model.parameters())


def config(root: Path, name: str, teacher: dict, *, epochs: int, length: int, batch: int,
           text: str = "corpus.txt") -> Path:  # fmt: skip
    import yaml

    cfg = {
        "task": "lm", "name": name,
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": teacher,
        "data": {"text_files": [str(root / text)], "max_length": length, "batch_size": batch},
        "distill": {"divergence": "fkl", "temperature": 1.0},
        "train": {"epochs": epochs, "optimizer": {"name": "AdamW", "lr": 0.001},
                  "progress": False, "seed": 0},
        "run_dir": str(root / "runs" / name),  # a child trains in a fresh one beside it
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def exactness(root: Path, url: str, length: int) -> dict[str, float]:
    """Relative loss and gradient differences: served (k = V) vs in-process; vLLM vs kdkit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kdkit.lm.align import Aligner
    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.serve.client import ServedTeacher
    from kdkit.lm.task import LMTask

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    rows = load_lm_dataset([str(root / "small.txt")], tok, max_length=length).rows[:4]
    batch = Aligner(pad_id=tok.pad_token_id, max_length=length)(rows)
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"))

    class Data:
        max_length, pack = length, True

    def run(source):
        torch.manual_seed(1)
        student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "student"))
        out = LMTask(student, source, probe=False).step(batch)
        out.loss.backward()
        return out.loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])

    def diff(a, b) -> tuple[float, float]:
        return (float((a[0] - b[0]).abs() / b[0].abs()),
                float((a[1] - b[1]).abs().max() / b[1].abs().max()))  # fmt: skip

    def served(**kw):
        s = ServedTeacher(url, **kw)
        s.check_run(Data, tok, len(tok))
        return s

    full, native, vllm = served(topk=len(tok)), served(topk=20), served(topk=20, protocol="vllm")
    d1, d2 = diff(run(full), run(teacher)), diff(run(vllm), run(native))
    return {"served_vs_inprocess_loss": d1[0], "served_vs_inprocess_grad": d1[1],
            "vllm_vs_kdkit_loss": d2[0], "vllm_vs_kdkit_grad": d2[1]}  # fmt: skip


def capacity(root: Path, url: str, length: int, batch: int, batches: int = 24) -> float:
    """Tokens/s the server alone delivers: training batches sent back to back, two in flight
    (the prefetch's depth), no student: the most a served run can train at."""
    from transformers import AutoTokenizer

    from kdkit.lm.align import Aligner
    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.serve.client import ServedTeacher
    from kdkit.lm.serve.prefetch import ServedLoader

    _pin(0)
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    rows = load_lm_dataset([str(root / "corpus.txt")], tok, max_length=length, pack=True,
                           overflow="split").rows  # fmt: skip
    align = Aligner(pad_id=tok.pad_token_id, max_length=length)
    data = [align(rows[i : i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    data = (data * (batches // len(data) + 1))[:batches]  # the corpus's batches, cycled

    class Data:
        max_length, pack = length, True

    served = ServedTeacher(url, topk=32, prefetch=2)
    served.check_run(Data, tok, len(tok))
    list(ServedLoader(data[:4], served, 2))  # warm
    start = time.perf_counter()
    tokens = sum(b.n_tokens for b in ServedLoader(data, served, 2))
    served.close()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    p.add_argument("--chars", type=int, default=120_000, help="corpus characters")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mem-hidden", type=int, default=768)
    p.add_argument("--mem-layers", type=int, default=12)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.cpu)
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, args.chars, args.vocab, args.length)
        results = run_all(root, args)
    results["load_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def run_all(root: Path, args: argparse.Namespace) -> dict:
    from kdkit.config import load_resolved
    from kdkit.run.lm_job import capture_run

    kw = dict(epochs=args.epochs, length=args.length, batch=args.batch)
    online = config(root, "online", {"model": f"hf:{root / 'teacher'}"}, **kw)
    start = time.perf_counter()
    capture_run(load_resolved(online), root / "cache", topk=32, progress=False)
    print(f"capture (top 32, q8): {time.perf_counter() - start:.1f} s, not counted")
    results: dict = {}
    with Server(f"hf:{root / 'teacher'}") as eager, \
            Server(f"hf:{root / 'teacher'}", "--backend", "onnx") as onnx:  # fmt: skip
        results["exactness"] = exactness(root, eager.url, args.length)
        print("exactness:", results["exactness"])
        results["server_alone_tok_per_s"] = {
            name: capacity(root, server.url, args.length, args.batch)
            for name, server in (("served", eager), ("served-onnx", onnx))
        }
        print("the server alone:", results["server_alone_tok_per_s"])
        configs = {
            "cache": config(root, "cache", {"model": f"cache:{root / 'cache'}"}, **kw),
            "online": online,
            "served": config(root, "served", {"model": eager.url, "served": {"topk": 32}}, **kw),
            "served-onnx": config(root, "served-onnx", {"model": onnx.url, "served": {"topk": 32}}, **kw),
        }  # fmt: skip
        results.update(throughput(configs, args.rounds))
    results["memory"] = memory(root, args, kw)
    return results


def throughput(configs: dict[str, Path], rounds: int) -> dict:
    """``rounds`` rounds of the rows, interleaved; each round's 1-minute load average beside
    it (other jobs on the machine show there)."""
    rows = []
    for r in range(rounds):
        row = {}
        for name in ROWS:
            out = _run_child(configs[name])
            row[name] = statistics.mean(out["tok_per_s"][1:] or out["tok_per_s"])
            row[f"{name}_per_cpu_s"] = out["tokens"] / out["cpu_s"]  # the whole run's
            row[f"{name}_wait"] = out["wait_s"] / out["wall_s"]  # blocked on the server
            row[f"{name}_runqueue"] = out["runqueue_s"] / out["wall_s"]  # other jobs had its core
            row[f"{name}_rss_mb"] = out["peak_rss_mb"]
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{n} {row[n]:,.0f}" for n in ROWS)
              + f" tokens/s (load {row['load']:.2f})")  # fmt: skip
    return {
        "rounds": rows,
        "median_tok_per_s": {n: statistics.median(x[n] for x in rows) for n in ROWS},
        "median_vs_cache": {n: statistics.median(x[n] / x["cache"] for x in rows) for n in ROWS},
        "median_per_cpu_s_vs_cache": {
            n: statistics.median(x[f"{n}_per_cpu_s"] / x["cache_per_cpu_s"] for x in rows)
            for n in ROWS
        },
        "median_wait": {n: statistics.median(x[f"{n}_wait"] for x in rows) for n in ROWS},
        "median_runqueue": {n: statistics.median(x[f"{n}_runqueue"] for x in rows) for n in ROWS},
    }


def memory(root: Path, args: argparse.Namespace, kw: dict) -> dict:
    """Peak RSS of one epoch on the small text with a larger teacher in the process and
    served (and the server's own)."""
    params = big_teacher(root, args.mem_hidden, args.mem_layers, args.length)
    small = dict(kw, epochs=1, text="small.txt")
    with Server(f"hf:{root / 'big'}") as big:
        mem = {
            "teacher_params": params,
            "online_rss_mb": _run_child(
                config(root, "mem-online", {"model": f"hf:{root / 'big'}"}, **small)
            )["peak_rss_mb"],
            "served_rss_mb": _run_child(config(root, "mem-served", {"model": big.url}, **small))[
                "peak_rss_mb"
            ],
            "server_rss_mb": big.peak_rss_mb(),
        }
    print("memory:", mem)
    return mem


if __name__ == "__main__":
    main()
