"""Serving many adapters: gpt2lora's continuous-batching engine against transformers + peft, in one process.

    python benchmarks/bench_serve.py --threads 1                      # gpt2 shape, writes RESULTS.md "Serving"
    python benchmarks/bench_serve.py --shape tiny --requests 2 --no-write   # seconds-long smoke run

N clients (threads) each send R requests one after another (a closed loop: the next as soon as the last is
answered) over K LoRA adapters, prompts and outputs of mixed lengths, greedy, no early stop (random weights,
``max_tokens`` always reached, so every contender does the same useful work). Three servers answer them:

* **gpt2lora engine**: :class:`gpt2lora.app.serve.engine.Engine`, rows of every adapter in each forward pass,
  requests joining and leaving at any decoding step (the engine behind ``gpt2lora serve``, without HTTP);
* **peft, batches per adapter**: transformers + peft serving the common way, waiting requests of one adapter
  batched after ``set_adapter`` (S-LoRA's "peft" baseline), the batch running until its longest request ends;
* **peft, adapter_names**: peft's mixed batches (``generate(adapter_names=...)``), up to ``max_batch`` waiting
  requests of any adapters at once, without continuous batching.

With ``--http`` a fourth contender runs the same requests through the real server: ``gpt2lora serve`` in its own
process on 127.0.0.1 (same base, adapters, ``--max-batch`` and ``--threads``), each client a thread with the
``openai`` client sending token-id prompts; its throughput counts the completion tokens the server reports, and
its text is compared with the engine's tokens decoded. The server's resident memory is read before and after.

Throughput counts the requested new tokens per second of wall time; latency is per request, from submission
to its last token. Every contender's tokens are compared with the engine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved, machine_line, write_section
from pairs import SHAPES, TARGETS, hf_config, pad_id

import gpt2lora as gl
from gpt2lora.app.serve.engine import Engine, GenerationRequest

Job = tuple[list[int], str, int]  # prompt ids, adapter, new tokens
HTTP = "gpt2lora serve over HTTP"


def workload(clients: int, requests: int, adapters: list[str], vocab: int, prompt: tuple[int, int],
             output: tuple[int, int], seed: int = 0) -> list[list[Job]]:
    """Each client's requests: random prompts and output lengths, adapters dealt round-robin."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for c in range(clients):
        mine = []
        for r in range(requests):
            n_prompt = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
            n_new = int(torch.randint(output[0], output[1] + 1, (1,), generator=g))
            ids = torch.randint(0, vocab, (n_prompt,), generator=g).tolist()
            mine.append((ids, adapters[(c + r) % len(adapters)], n_new))
        jobs.append(mine)
    return jobs


def drive(answer: Callable[[Job], Any], jobs: list[list[Job]]) -> dict[str, Any]:
    """Run every client's requests in its own thread; wall time, per-request latency, outputs."""
    latencies: list[float] = []
    outputs: dict[tuple[int, int], Any] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for r, job in enumerate(jobs[c]):
            start = time.perf_counter()
            tokens = answer(job)
            with lock:
                latencies.append(time.perf_counter() - start)
                outputs[(c, r)] = tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(jobs))]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(n for mine in jobs for _, _, n in mine)
    ordered = sorted(latencies)
    return {"wall": wall, "cpu": cpu, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "outputs": outputs,
            "latencies": latencies}


def engine_answer(engine: Engine) -> Callable[[Job], list[int]]:
    def answer(job: Job) -> list[int]:
        ids, adapter, n = job
        done = threading.Event()
        tokens: list[int] = []

        def emit(text: str, token: int | None, reason: str | None) -> None:
            if token is not None:
                tokens.append(token)
            if reason is not None:
                done.set()

        engine.submit(GenerationRequest(ids, adapter, n, emit, lambda _: ""))
        done.wait()
        return tokens
    return answer


class StaticBatcher:
    """A serving loop of transformers + peft: waiting requests are batched, the batch runs to its longest
    request, then the next batch starts. ``per_adapter``: a batch holds one adapter's requests (``set_adapter``
    before it); otherwise any adapters, through peft's ``adapter_names``."""

    def __init__(self, twin: torch.nn.Module, max_batch: int, per_adapter: bool, pad: int) -> None:
        self.twin, self.max_batch, self.per_adapter, self.pad = twin, max_batch, per_adapter, pad
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.batches = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def answer(self, job: Job) -> list[int]:
        slot = {"job": job, "done": threading.Event()}
        with self.cond:
            self.waiting.append(slot)
            self.cond.notify()
        slot["done"].wait()
        return slot["tokens"]

    def take(self) -> list[dict]:
        with self.cond:
            while not self.waiting and not self.stopped:
                self.cond.wait()
            if self.per_adapter and self.waiting:
                adapter = self.waiting[0]["job"][1]  # the oldest request's adapter goes first
                batch = [s for s in self.waiting if s["job"][1] == adapter][: self.max_batch]
            else:
                batch = list(self.waiting)[: self.max_batch]
            for s in batch:
                self.waiting.remove(s)
            return batch

    def loop(self) -> None:
        while True:
            batch = self.take()
            if not batch:
                return
            jobs = [s["job"] for s in batch]
            width = max(len(ids) for ids, _, _ in jobs)
            ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
            mask = torch.zeros(len(jobs), width, dtype=torch.long)
            for row, (prompt, _, _) in enumerate(jobs):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            new = max(n for _, _, n in jobs)
            extra = {}
            if self.per_adapter:
                self.twin.set_adapter(jobs[0][1])
            else:
                extra["adapter_names"] = [a for _, a, _ in jobs]
            with torch.no_grad():
                out = self.twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False, pad_token_id=self.pad, **extra)
            self.batches += 1
            for row, s in enumerate(batch):
                s["tokens"] = out[row, width: width + jobs[row][2]].tolist()
                s["done"].set()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()


def vocabulary_folder() -> Path:
    """The GPT-2 tokenizer files (the server needs them beside the base): ``$GPT2LORA_SHARED/gpt2-tokenizer``."""
    shared = Path(os.environ.get("GPT2LORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    folder = shared / "gpt2-tokenizer"
    if not (folder / "vocab.json").is_file():
        raise SystemExit(f"--http needs the GPT-2 tokenizer files in {folder} (set GPT2LORA_SHARED)")
    return folder


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class HttpServer:
    """``gpt2lora serve`` in a subprocess on a free 127.0.0.1 port, and an ``openai`` client's answer to a job."""

    def __init__(self, folder: Path, adapters: list[str], max_batch: int, queue: int, threads: int) -> None:
        import openai

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "gpt2lora.app.cli", "serve", str(folder / "base"), "--name", "base",
                   "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(queue),
                   "--threads", str(threads), "--device", "cpu"]
        for name in adapters:
            command += ["--adapter", f"{name}={folder / name}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.client.models.list()
                break
            except openai.APIConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise SystemExit("gpt2lora serve did not start: " + self.process.stderr.read().decode()[-2000:])
                time.sleep(0.2)
        self.completion_tokens = 0
        self.lock = threading.Lock()
        self.rss: list[float] = []

    def answer(self, job: Job) -> str:
        ids, adapter, n = job
        response = self.client.completions.create(model=adapter, prompt=ids, max_tokens=n, temperature=0)
        with self.lock:
            self.completion_tokens += response.usage.completion_tokens
        return response.choices[0].text

    def stop(self) -> None:
        self.rss.append(rss_mib(self.process.pid))
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def build(shape: str, folder: Path, adapters: list[str], rank: int,
          vocabulary: Path | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """gpt2lora's model and peft's twin with the same base and the same K adapters (saved once, loaded by both)."""
    import peft
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config(shape, dropout=0.0)).save_pretrained(folder / "base")
    if vocabulary is not None:  # for the HTTP server, which loads the tokenizer beside the base
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(vocabulary / name, folder / "base" / name)
    ours = gl.GPT2.from_pretrained(folder / "base").eval()
    for i, name in enumerate(adapters):
        model = gl.GPT2.from_pretrained(folder / "base")
        gl.apply_lora(model, gl.LoRAConfig(rank=rank, alpha=2 * rank, targets=TARGETS), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        gl.save_adapter(model, folder / name)
        gl.load_adapter(ours, folder / name, adapter_name=name)
    base = transformers.GPT2LMHeadModel.from_pretrained(folder / "base").eval()
    base.generation_config.eos_token_id = None  # no early stop: every request runs to max_tokens
    twin = peft.PeftModel.from_pretrained(base, folder / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        twin.load_adapter(folder / name, adapter_name=name)
    return ours, twin.eval()


def step_costs(model: torch.nn.Module, adapters: list[str], vocab: int, new: int = 8) -> dict[int, float]:
    """Seconds per decoding step of ``generate`` (mixed adapters) with 4 and with 16 rows, timed interleaved."""
    g = torch.Generator().manual_seed(2)
    calls = {}
    for rows in (4, 16):
        ids = torch.randint(0, vocab, (rows, 32), generator=g)
        names = [adapters[i % len(adapters)] for i in range(rows)]
        for n in (1, 1 + new):
            calls[(rows, n)] = lambda ids=ids, names=names, n=n: model.generate(
                ids, max_new_tokens=n, eos_token_id=None, adapter_names=names)
    timings = interleaved(calls, repeats=3, warmup=1)
    return {rows: (timings[(rows, 1 + new)].median - timings[(rows, 1)].median) / new for rows in (4, 16)}


def merged(runs: list[dict]) -> dict[str, object]:
    """Several runs of one contender: median throughput and wall time, latency percentiles over every request."""
    latencies = sorted(x for r in runs for x in r["latencies"])
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in runs),
            "wall": statistics.median(r["wall"] for r in runs), "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "outputs": runs[0]["outputs"], "repeats": [r["tokens_per_s"] for r in runs]}


def timed(contenders: dict, runs: dict[str, list[dict]], jobs: list[list[Job]], warm: list[list[Job]],
          repeats: int, servers: list[HttpServer]) -> None:
    """Each contender's runs of ``jobs`` after a warm-up, interleaved: A, B, C, then C, B, A ... (slow phases of a
    shared CPU hit every contender)."""
    for repeat in range(repeats):
        order = list(contenders.items())
        for label, start in order if repeat % 2 == 0 else reversed(order):
            answer, stop = start()
            drive(answer, warm)
            if label == HTTP:
                servers[-1].completion_tokens = 0
                servers[-1].rss.append(rss_mib(servers[-1].process.pid))
                server_cpu = cpu_seconds(servers[-1].process.pid)
            runs[label].append(drive(answer, jobs))
            r = runs[label][-1]
            if label == HTTP:  # what the server generated (it stops at end of text, the others never do)
                r["cpu"] += cpu_seconds(servers[-1].process.pid) - server_cpu  # the server's and the clients'
                r["tokens_per_s"] = servers[-1].completion_tokens / r["wall"]
                r["tokens_per_cpu_s"] = servers[-1].completion_tokens / r["cpu"]
            stop()
            print(f"{label}: {r['tokens_per_s']:.1f} tokens/s, p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s",
                  flush=True)


def run(shape: str, clients: int, requests: int, n_adapters: int, max_batch: int, prompt: tuple[int, int],
        output: tuple[int, int], rank: int, repeats: int = 1, http: bool = False,
        threads: int = 1) -> dict[str, Any]:
    adapters = [f"adapter{i}" for i in range(n_adapters)]
    vocab = SHAPES[shape].get("vocab_size", 50257)
    jobs = workload(clients, requests, adapters, vocab, prompt, output)
    warm = workload(2, 1, adapters, vocab, (4, 8), (2, 4), seed=1)
    servers: list[HttpServer] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, twin = build(shape, Path(tmp), adapters, rank, vocabulary_folder() if http else None)
        engine = Engine(ours, None, max_batch=max_batch, max_queue=10 * clients * requests)
        contenders: dict[str, Callable[[], tuple[Callable[[Job], Any], Callable[[], None]]]] = {
            "gpt2lora engine": lambda: (engine_answer(engine), lambda: None),
        }
        if http:
            def serve() -> tuple[Callable[[Job], Any], Callable[[], None]]:
                server = HttpServer(Path(tmp), adapters, max_batch, 10 * clients * requests, threads)
                servers.append(server)
                return server.answer, server.stop
            contenders[HTTP] = serve
        for label, per_adapter in (("peft, batches per adapter", True), ("peft, adapter_names", False)):
            def start(per_adapter=per_adapter):
                batcher = StaticBatcher(twin, max_batch, per_adapter, pad_id(shape))
                return batcher.answer, batcher.stop
            contenders[label] = start
        runs: dict[str, list[dict]] = {label: [] for label in contenders}
        try:
            timed(contenders, runs, jobs, warm, repeats, servers)
        finally:
            for server in servers:
                if server.process.poll() is None:
                    server.process.kill()
        engine.stop()
        results = {label: merged(r) for label, r in runs.items()}
        steps = step_costs(ours, adapters, vocab)
        decode = gl.load_tokenizer(Path(tmp) / "base").decode if http else None
    mine = results["gpt2lora engine"]["outputs"]
    for label, result in results.items():
        if label == HTTP:
            result["same"] = sum(result["outputs"][k] == decode(mine[k]) for k in mine) / len(mine)
        else:
            result["same"] = sum(result["outputs"][k] == mine[k] for k in mine) / len(mine)
    out = {"results": results, "requests": clients * requests, "tokens": sum(n for c in jobs for _, _, n in c),
           "steps": steps}
    if servers:
        out["rss"] = [server.rss for server in servers]
    return out


NOTES = """\
Where the gain comes from: per generated token, a decoding step of 16 rows costs 1/16 of its time and one of 4
rows 1/4 (figure above), so the engine, which keeps about 16 rows of any adapters in every pass, does each token
for a fraction of what per-adapter batches of about 4 rows pay; that ratio bounds the gain over (a) on this CPU,
where a step's cost still grows with its rows (one thread does the multiply-adds). Over peft's own mixed batches
(b), the gain is what static batches waste: rows padded to the longest prompt of their batch, rows decoded past
their own `max_tokens` until the batch's longest request ends, clients idle while a batch they cannot join
runs, and transformers' per-step overhead. Prompts are prefilled as they arrive: those admitted together in
forwards of similar lengths (at most 64 padding positions a forward, `engine.prefill_groups`). The engine's
decoding step runs the kernels of a plain `generate` step (`few_row_products`, one routed LoRA product per layer:
two matmuls over the adapters' stacked factors and a row mask); for 2 to 32 fp32 rows the measured kernel choice
includes oneDNN's product on a packed copy of each weight (`ops/packed.py`: `F.linear` repacks the weight on
every call of a few rows; the packed copies take as much memory as the weights), and row counts share a choice in
buckets (1, 2, 3-4, 5-8, 9-16, ...), so the first run of a fresh process still times kernels (the "each run"
column: the first run is the coldest). What a step does beyond the base model's products is kept small: the stacked factors are built
once and kept across steps (`peft.mixed.FactorCache`, checked against the adapters' tensors each step, dropped
after any engine command such as loading an adapter), attention reads the shared KV frame only from the first
token of the earliest running row (the frame narrows for free when a long row leaves; it is compacted when
holes make it twice the longest row), and the greedy pick uses `max()` (argmax's first index, faster on CPU).
The engine row is measured in-process (the `Engine` behind `gpt2lora serve`, without HTTP), like the peft
serving loops; `--http` adds the real server.\
"""


def report(args: argparse.Namespace, out: dict, load: tuple[float, float]) -> str:
    results = out["results"]
    engine = results["gpt2lora engine"]
    command = (f"python benchmarks/bench_serve.py --shape {args.shape} --clients {args.clients} --requests "
               f"{args.requests} --adapters {args.adapters} --max-batch {args.max_batch} --threads {args.threads} "
               f"--repeats {args.repeats}{' --http' if args.http else ''}")
    lines = [f"Command: `{command}`  ", f"Machine: {machine_line()}  ",
             (f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after (this benchmark alone keeps one core "
             "busy; above about 1, other work shared the CPU: then read the ratios, from the same run and the same "
             "requests, rather than the seconds)."), "",
             (f"{args.clients} clients, each sending {args.requests} requests one after another, over {args.adapters} "
             f"LoRA adapters (r={args.rank} on {', '.join(TARGETS)}); prompts of {args.prompt[0]}-{args.prompt[1]} "
             f"tokens, {args.output[0]}-{args.output[1]} new tokens, greedy; {out['requests']} requests, "
             f"{out['tokens']} new tokens in all; at most {args.max_batch} rows per batch."), "",
             ("| server | tokens/s (median) | each run | p50 latency (s) | p95 latency (s) | wall (s) | "
              "engine's throughput | same tokens as the engine |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        runs = ", ".join(f"{x:.1f}" for x in r["repeats"])
        lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {runs} | {r['p50']:.2f} | {r['p95']:.2f} | {r['wall']:.1f} | "
                     f"{engine['tokens_per_s'] / r['tokens_per_s']:.2f}× | {100 * r['same']:.0f} % |")
    a, b = results["peft, batches per adapter"], results["peft, adapter_names"]
    ra, rb = engine["tokens_per_s"] / a["tokens_per_s"], engine["tokens_per_s"] / b["tokens_per_s"]
    cpu = ", ".join(f"{label} {r['tokens_per_cpu_s']:.1f} ({engine['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}×)"
                    for label, r in results.items() if label != "gpt2lora engine")
    lines += ["", (f"Per CPU-second of this process (what contention from other work inflates least: the engine "
                   f"and peft's loops each use one thread), tokens: gpt2lora engine "
                   f"{engine['tokens_per_cpu_s']:.1f}; {cpu} (the engine's figure over each).")]
    ca = engine["tokens_per_cpu_s"] / a["tokens_per_cpu_s"]
    cb = engine["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
    lines += ["", (f"Goal ≥ 3× (a) per-adapter batches: **{'met' if min(ra, ca) >= 3 else 'not met'}** ({ra:.2f}× "
              f"in wall time, {ca:.2f}× per CPU-second); goal ≥ 1.5× (b) peft's mixed batches: "
              f"**{'met' if min(rb, cb) >= 1.5 else 'not met'}** ({rb:.2f}×, {cb:.2f}×); "
              f"p95 latency {engine['p95']:.2f} s against {a['p95']:.2f} s (a) and {b['p95']:.2f} s (b): "
              f"**{'lower' if engine['p95'] < min(a['p95'], b['p95']) else 'not lower'}**.")]
    if HTTP in results:
        h = results[HTTP]
        rss = out["rss"]
        lines += ["", (f"Through HTTP (`gpt2lora serve` in its own process, {args.clients} `openai` clients in this "
                  f"one): {h['tokens_per_s']:.1f} tokens/s, {h['tokens_per_s'] / engine['tokens_per_s']:.2f}× the "
                  f"in-process engine, {h['tokens_per_s'] / a['tokens_per_s']:.2f}× (a) and "
                  f"{h['tokens_per_s'] / b['tokens_per_s']:.2f}× (b); p50 {h['p50']:.2f} s, p95 {h['p95']:.2f} s "
                  f"(engine in-process {engine['p50']:.2f} s, {engine['p95']:.2f} s). The server's resident memory "
                  "after its warm-up request and after the load, MiB: "
                  + ", ".join(f"{x:.0f} → {y:.0f}" for x, y in rss) + ".")]
    steps = out["steps"]
    lines += ["", (f"One decoding step of `generate` with mixed adapters, measured in the same run: "
              f"{1000 * steps[4]:.0f} ms for 4 rows, {1000 * steps[16]:.0f} ms for 16 rows "
              f"({steps[16] / steps[4]:.2f}× for 4× the rows): per token, a 4-row step costs "
              f"{4 * steps[4] / steps[16]:.2f}× a 16-row one."), "", NOTES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--output", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender, interleaved")
    parser.add_argument("--http", action="store_true",
                        help="also run the requests through `gpt2lora serve` on 127.0.0.1 (needs .[serve] and openai)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    out = run(args.shape, args.clients, args.requests, args.adapters, args.max_batch, tuple(args.prompt),
              tuple(args.output), args.rank, args.repeats, http=args.http, threads=args.threads)
    text = report(args, out, (before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section("Serving: continuous batching across adapters", text)


if __name__ == "__main__":
    main()
