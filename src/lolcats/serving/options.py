"""Options of ``lolcats serve``: one dataclass; the command's flags are derived from it (``lolcats.cli``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    "Address to listen on (0.0.0.0 for every interface)."
    port: int = 8000
    "TCP port."
    served_model_name: str = "lolcats"
    "The model id clients name in requests and /v1/models lists."
    attention_mode: Literal["student", "teacher"] = "student"
    ("student: the converted layers with constant-size states; teacher: the same weights with softmax "
     "attention over preallocated key/value slots (the baseline).")
    max_batch: int = 64
    "Sequences decoded together (slots); more requests wait in the queue."
    max_queue: int = 256
    "Requests that may wait for a slot; beyond that a request gets 429."
    max_prompt_tokens: int = 4096
    "Longest prompt accepted (tokens)."
    max_new_tokens: int = 1024
    "Largest max_tokens accepted."
    max_request_bytes: int = 0
    "Largest request body (bytes; 413 beyond, before it is read); 0: 1 MiB + 128 bytes per --max-prompt-tokens."
    prefill_chunk: int = 512
    "Longest piece of one prompt read at a time (the first chunk replays a CUDA graph per length bucket)."
    prefill_budget: int = 2048
    ("Prompt tokens read between two decode steps, in forwards of one or more prompts (0: one forward), and a "
     "forward's tokens if above --prefill-chunk. More admits requests faster (time to first token), less keeps "
     "the running streams' time per token down (2048: long prompts' chunks read four at a time, docs/SERVING.md).")
    prefill_rows: int = 8
    ("Prompts read together in one forward, up to N (a staging row each, holding a sequence's state; its keys and "
     "values in teacher mode), within --prefill-chunk tokens, or --prefill-budget if larger: waiting prompts that "
     "fit in one chunk (right-padded to the longest; a CUDA graph per rows and length bucket), or the next chunks "
     "of longer ones, each from its own position.")
    batch_bucket_step: int = 0
    ("Decode batch buckets (one CUDA graph each per sampling variant): powers of two up to this, then its "
     "multiples (64: 1, 2, ..., 64, 128, 192, ...); 0: powers of two up to --max-batch. Finer buckets compute fewer "
     "idle rows per step and capture more graphs at start-up.")
    prefill_bucket_step: int = 0
    ("First-chunk length buckets (a CUDA graph each): powers of two from 16 up to this, then its multiples; 0: "
     "powers of two up to --prefill-chunk. Finer buckets pad prompts less and capture more graphs.")
    softmax_window: int = 0
    ("Layers kept as softmax attention cache the keys of the last N positions only (and --softmax-sink's), which "
     "bounds their slots' memory whatever --max-prompt-tokens; 0: every position (student mode).")
    softmax_sink: int = 0
    "With --softmax-window: kept softmax layers also keep the first N positions' keys (attention sinks)."
    kv_tokens: int = 0
    ("Page the key/value stores (teacher: every layer; student: the layers kept as softmax attention): one pool of "
     "N positions, in pages of 64, for all sequences; a sequence takes the pages of its prompt + max_tokens when it "
     "starts and gives them back when it ends, and waits while too few are free. At least --max-prompt-tokens + "
     "--max-new-tokens + 1. 0: every slot holds that many positions, or where those do not fit in the free memory, "
     "the largest pool that does.")
    cuda_graph: bool = True
    "Replay each decode step from a CUDA graph (on CUDA devices)."
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    "uvicorn's log level."

    def check(self) -> None:
        for name in ("max_batch", "max_prompt_tokens", "max_new_tokens", "prefill_chunk", "prefill_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve: --{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("prefill_budget", "batch_bucket_step", "prefill_bucket_step", "max_request_bytes",
                     "softmax_window", "softmax_sink", "kv_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"serve: --{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.softmax_sink and not self.softmax_window:
            raise ValueError("serve: --softmax-sink needs --softmax-window")
        if self.softmax_window and self.attention_mode == "teacher":
            raise ValueError("serve: --softmax-window bounds the layers kept as softmax attention in student mode; "
                             "teacher mode keeps every position")
        longest = self.max_prompt_tokens + self.max_new_tokens + 1
        if 0 < self.kv_tokens < longest:
            raise ValueError(f"serve: --kv-tokens {self.kv_tokens} holds no sequence of --max-prompt-tokens + "
                             f"--max-new-tokens + 1 = {longest} positions")
        if self.max_queue < 0:
            raise ValueError(f"serve: --max-queue must be >= 0, got {self.max_queue}")

    def request_bytes_limit(self) -> int:
        return self.max_request_bytes or (1 << 20) + 128 * self.max_prompt_tokens
