"""Benchmark: what a huge document costs the documents queued behind it, in `feature-pipeline run`
with the real broker and model.

A generated article (`huge_document.article_document`, 10 MB by default) is published, then one
small post every `--post-every` seconds while the article is being written. For each setting
of `LONG_DOCUMENT_TURN_S` given (`--turn-s`, repeatable), and for turns switched off (a turn
longer than any run: the limit measured in the same run, what the posts waited before turns),
a fresh pipeline and queue report: each post's latency from publish to written, the article's
wall time and turns, and the pipeline's peak RSS (VmHWM). Prints the figures and writes
bench/results/long-document-turns.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
from huge_document import RESULTS, SAMPLES, TARGET_MB, _vm_hwm_mb, article_document, read_jsonl

from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.connectors.rabbitmq.topology import delete_topology
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import load_settings

#: A turn no run reaches: turns off, every document finished in its batch.
NO_TURNS_S = 1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _applied(port: int, data_type: str) -> tuple[int, int]:
    """(changes applied of `data_type`, events continued) from the pipeline's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()

    def value(name: str) -> int:
        pattern = rf'^feature_pipeline_{name}_total\{{type="{data_type}"\}} (\S+)$'
        found = re.search(pattern, text, re.M)
        return int(float(found.group(1))) if found else 0

    return value("events_applied"), value("events_continued")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10):
            return True
    except OSError:
        return False


def run_case(turn_s: float, article: dict[str, Any], args: argparse.Namespace, work: Path) -> dict:
    queue = f"bench-turns-{uuid.uuid4().hex[:12]}"
    settings = load_settings(rabbitmq_queue=queue, rabbitmq_shards=0)
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RABBITMQ_QUEUE": queue,
        "RABBITMQ_SHARDS": "0",
        "QDRANT_PATH": str(work / queue),
        "QUERY_PORT": str(port),
        "LOG_LEVEL": "INFO",
        "LONG_DOCUMENT_TURN_S": str(turn_s),
    }
    log_path = work / f"{queue}.log"
    posts = read_jsonl(SAMPLES / "posts.jsonl")
    with EventPublisher(settings) as publisher, log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "feature_pipeline.cli", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while not _ready(port):
                if child.poll() is not None:
                    raise SystemExit(f"run exited {child.returncode}: see {log_path}")
                time.sleep(0.2)
            event = ChangeEvent(
                op=Op.INSERT,
                type=DataType.ARTICLES,
                entry_id="huge-article",
                document=event_document(article),
                ts=1,
            )
            started = time.monotonic()
            publisher.publish([event], to_main_queue=True)
            published: list[float] = []
            written: list[float] = []
            article_done: float | None = None
            continued = 0
            while article_done is None or len(written) < len(published):
                now = time.monotonic()
                if article_done is None and (
                    not published or now - published[-1] >= args.post_every
                ):
                    doc = posts[len(published) % len(posts)]
                    post = ChangeEvent(
                        op=Op.INSERT,
                        type=DataType.POSTS,
                        entry_id=f"post-{len(published)}",
                        document=event_document(doc),
                        ts=1,
                    )
                    publisher.publish([post], to_main_queue=True)
                    published.append(time.monotonic())
                posts_done, _ = _applied(port, "posts")
                written.extend([time.monotonic()] * (posts_done - len(written)))
                articles_done, continued = _applied(port, "articles")
                if articles_done and article_done is None:
                    article_done = time.monotonic()
                if child.poll() is not None:
                    raise SystemExit(f"run exited {child.returncode}: see {log_path}")
                if now - started > args.timeout_s:
                    raise SystemExit(f"not done after {args.timeout_s} s: see {log_path}")
                publisher.process_events()
                time.sleep(0.2)
            peak = _vm_hwm_mb(child.pid)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=120)
            connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
            delete_topology(connection.channel(), settings)
            connection.close()
    latencies = sorted(w - p for p, w in zip(published, written, strict=True))
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    return {
        "long_document_turn_s": None if turn_s >= NO_TURNS_S else turn_s,
        "article_s": round((article_done or 0) - started, 1),
        "article_turns": continued + 1,
        "posts": len(latencies),
        "post_latency_p50_s": round(latencies[len(latencies) // 2], 2),
        "post_latency_max_s": round(latencies[-1], 2),
        "peak_rss_mb": peak,
        "within_target": peak is not None and peak <= TARGET_MB,
        "tracebacks": log_text.count("Traceback (most recent call last)"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--article-mb", type=float, default=10.0)
    parser.add_argument(
        "--turn-s",
        type=float,
        action="append",
        help="LONG_DOCUMENT_TURN_S values to run (default: 30, the default, and 5)",
    )
    parser.add_argument("--post-every", type=float, default=2.0, help="seconds between posts")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "long-document-turns.json")
    args = parser.parse_args()

    article = article_document(int(args.article_mb * 1_000_000), args.seed)
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/long_document_turns.py", *sys.argv[1:]]),
        "article_mb": args.article_mb,
        "load_start": os.getloadavg(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="turns-bench-") as tmp:
        for turn_s in [*(args.turn_s or [30.0, 5.0]), NO_TURNS_S]:
            case = run_case(turn_s, article, args, Path(tmp))
            results["cases"].append(case)
            label = "turns off" if case["long_document_turn_s"] is None else f"turn {turn_s:g} s"
            print(
                f"{label:>12}: article {case['article_s']:,.0f} s in {case['article_turns']} "
                f"turn(s); {case['posts']} posts, latency p50 {case['post_latency_p50_s']} s, "
                f"max {case['post_latency_max_s']} s; peak RSS {case['peak_rss_mb']:,.0f} MB "
                f"(target {TARGET_MB:,.0f}: {'ok' if case['within_target'] else 'OVER'})"
            )
    results["load_end"] = os.getloadavg()
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0 if all(case["within_target"] for case in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
