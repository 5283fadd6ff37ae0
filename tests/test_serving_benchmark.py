"""benchmarks/serving.py at tiny sizes on CPU: passages, bad input, and end to end (every mode, load and row served)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import src_env, tiny_config, write_alpaca
from test_generation import char_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("httpx")
from benchmarks import serving  # imports openai and httpx

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
SENTENCES = [f"The cat number {i} sat on mat {j}." for i in range(4) for j in range(10)]


def tiny_files(tmp_path: Path) -> dict[str, Path]:
    """A config.json and a tokenizer (random weights through --model.init random), a saved base model
    directory of the same shape (the hf mode's), Alpaca records and a text of articles."""
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    cfg = tiny_config(vocab_size=len(tok.get_vocab()))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    docs = "\n\n\n".join(" ".join(SENTENCES[i:i + 10]) for i in range(0, len(SENTENCES), 10))
    (tmp_path / "docs.txt").write_text(docs)
    return {"config": tmp_path / "config.json", "tok": tmp_path / "tok", "base": tmp_path / "base",
            "alpaca": write_alpaca(tmp_path / "alpaca.jsonl", n=12), "docs": tmp_path / "docs.txt"}


def server_args(files: dict[str, Path]) -> str:
    return (f"--untrained --model.init random --model.name {files['config']} --model.tokenizer {files['tok']} "
            "--attention.window_size 8 --attention.feature_dim 8")


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = src_env(OMP_NUM_THREADS="1", HF_HUB_CACHE=str(tmp_path / "hub"))  # transformers serve lists the hub cache
    out = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--out", str(tmp_path / "bench"), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_passages_end_at_sentences_and_keep_the_text_in_order():
    tok = char_tokenizer()  # one token per character
    text = " ".join(SENTENCES)
    cut = text.index("The cat number 2")  # two documents
    passages = serving.cut_passages([text[:cut], text[cut:]], tok, 100, 1000)
    assert len(passages) > 5
    shortest = min(len(s) for s in SENTENCES)
    assert all(p.endswith(".") and shortest <= len(p) <= 100 + 2 for p in passages)  # + the documents' "\n\n"
    joined = " ".join(passages).replace("\n\n", " ")
    assert joined == text[:len(joined)] and len(joined) > len(text) - 100
    assert len(serving.cut_passages([text], tok, 100, 3)) == 3


def test_an_answer_without_text_is_served_and_a_broken_stream_is_not():
    """A stream whose only chunks are the finish and the usage (the model's first token ended the sequence) is a
    served request of its usage's tokens; one that ends with neither text nor usage is a "no output" error."""
    import asyncio
    from types import SimpleNamespace as NS

    class Stream:
        def __init__(self, chunks):
            self.chunks = chunks

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def __aiter__(self):
            async def gen():
                for c in self.chunks:
                    yield c
            return gen()

    finish = NS(choices=[NS(delta=NS(content=""))], usage=None)
    usage = NS(choices=[], usage=NS(prompt_tokens=7, completion_tokens=1))

    async def start(chunks):
        return Stream(chunks)

    empty = asyncio.run(serving.timed(lambda: start([finish, usage])))
    assert empty.ok and empty.output_tokens == 1 and empty.prompt_tokens == 7 and empty.latency >= empty.ttft > 0
    broken = asyncio.run(serving.timed(lambda: start([finish])))
    assert not broken.ok and broken.error == "no output"


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    files = tiny_files(tmp_path)
    with pytest.raises(SystemExit) as e:
        serving.parse_args(["--load", "chat"])
    assert e.value.code == 2 and "--load chat needs --chat-data FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serving.parse_args(["--modes", "student,vllm"])
    assert "--modes 'student,vllm'" in capsys.readouterr().err
    code = serving.main(["--server-args", server_args(files), "--modes", "student", "--load", "long",
                         "--doc-data", str(files["docs"]), "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "give --tokenizer NAME, --base NAME" in err


def test_serving_benchmark_smoke(tmp_path):
    """Random token ids at two rates, both lolcats modes: every request served (hf: skipped with its reason)."""
    files = tiny_files(tmp_path)
    out = run_bench(tmp_path, "--server-args", server_args(files), "--max-batch", "4", "--rates", "50,inf",
                    "--num-requests", "6", "--prompt-len", "12", "--output-len", "6", "--warmup-requests", "1",
                    "--client-procs", "1", "--warmup-seconds", "0")
    for mode in ("student", "teacher"):
        rows = json.loads((tmp_path / "bench" / f"{mode}.json").read_text())["rows"]
        assert [r["rate"] for r in rows] == [50, float("inf")]
        assert all(r["completed"] == 6 and r["failed"] == 0 and r["output_tok_s"] > 0 for r in rows)
        assert all(r["tpot_p99"] >= r["tpot_p50"] > 0 and r["ttft_p99"] >= r["ttft_p50"] > 0 for r in rows)
        assert all(r["latency_p50"] > r["ttft_p50"] and r["tail_p99"] >= r["tail_p50"] >= 0 for r in rows)
        timing = [r["server_timing"] for r in rows]
        assert all(t["iterations"] > 0 and t["busy_s"] > 0 and t["stalls"] >= 0 for t in timing), timing
    assert "student / teacher at that bound" in out.stdout or "best output tok/s" in out.stdout
    assert "hf: skipped: transformers serve has no ignore_eos" in (tmp_path / "bench" / "serving.md").read_text()


def test_serving_benchmark_real_prompts_every_mode(tmp_path):
    """Chat and long loads through the openai client, 1 and 2 clients (the 2 in two client processes), student,
    teacher and transformers serve on the base directory: every row there and every request served."""
    from transformers.utils.import_utils import is_serve_available

    files = tiny_files(tmp_path)
    out = run_bench(tmp_path, "--server-args", server_args(files), "--base", str(files["base"]),
              "--hf-args", "--device cpu --cb-num-blocks 64 --cb-max-batch-tokens 256",
              "--modes", "student,teacher,hf", "--load", "chat,long", "--chat-data", str(files["alpaca"]),
              "--doc-data", str(files["docs"]), "--doc-tokens", "60", "--clients", "1,2", "--num-requests", "3",
              "--max-tokens", "6", "--max-batch", "4", "--warmup-requests", "1", "--client-procs", "2",
              "--warmup-seconds", "0.2")
    bench = tmp_path / "bench"
    for m, load, c in itertools.product(("student", "teacher"), ("chat", "long"), (1, 2)):  # a warm-up before each row
        assert f"[{m}] warm-up, {load} at clients {c}:" in out.stdout
    report = json.loads((bench / "serving.json").read_text())
    modes = ["student", "teacher"] + (["hf"] if is_serve_available() else [])
    got = {(r["mode"], r["load"], r["clients"]) for r in report["rows"]}
    assert got == {(m, load, c) for m in modes for load in ("chat", "long") for c in (1, 2)}
    assert all(r["completed"] == r["requests"] == 3 and r["failed"] == 0 and r["output_tok_s"] > 0
               for r in report["rows"])
    assert all(r["ttft_p50"] > 0 and r["output_tokens"] <= 6 for r in report["rows"])
    assert all(r["prompt_tokens"] > 60 for r in report["rows"] if r["load"] == "long")  # passage + the question
    assert all(r["server_start_s"] > 0 for r in report["rows"])
    for r in report["rows"]:  # the shares of a row start together; each request's [sent, latency, TTFT, tokens]
        assert len(r["timeline"]) == 3 and r["first_sent"] < 1.0 and 0 < r["open_mean"] <= r["clients"]
        assert r["last_end"] <= r["seconds"] + 0.05 and all(s >= 0 and lat > ttft > 0 for s, lat, ttft, _ in
                                                            r["timeline"])
    md = (bench / "serving.md").read_text()
    assert report["card"] in md and "--load chat,long" in md and "## chat:" in md and "## long:" in md
    for m in modes:
        assert f"| {m} | 1 |" in md and f"| {m} | 2 |" in md
    if "hf" not in modes:
        assert "hf: skipped:" in md
    if importlib.util.find_spec("matplotlib"):
        assert (bench / "serving.png").stat().st_size > 0


def test_serving_host_benchmark_smoke(tmp_path):
    """benchmarks/serving_host.py end to end at tiny sizes: the server's threads' CPU per streamed token, from a
    real chat load through the openai client."""
    files = tiny_files(tmp_path)
    env = src_env(OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "benchmarks.serving_host", "--model", str(files["config"]),
                          "--tokenizer", str(files["tok"]), "--attn", "attention.window_size=8",
                          "--attn", "attention.feature_dim=8", "--chat-data", str(files["alpaca"]), "--clients", "4",
                          "--max-tokens", "16", "--max-batch", "4", "--duration", "2", "--client-procs", "1",
                          "--out", str(tmp_path / "bench")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tokens = int(out.stdout.split("host: ", 1)[1].splitlines()[1].split()[0])
    assert tokens >= 16, out.stdout
    per = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.stdout.splitlines()
           if line.startswith("| ") and line.count("|") == 3 and "thread" not in line and "---" not in line}
    assert per["all"] > 0 and {"lolcats-scheduler", "lolcats-uvicorn"} <= set(per), out.stdout
    assert "| student | 4 |" in out.stdout  # the clients' row, errors included
