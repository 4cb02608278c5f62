"""Benchmark of the `download` stage (figures go to docs/benchmarks.md, section `download`).

Everything runs locally (no internet needed): a threaded HTTP server on 127.0.0.1 serves a large
file and many small images, with a configurable per-request latency standing in for a remote
host. Measures:

1. fetch_file throughput and memory on a large file (streamed: memory must not grow with size),
   and the same with the connection dropped half-way (resumed with Range);
2. image downloads per second against a 20 ms-latency server for several --workers;
3. Amazon metadata scan (meta_image_urls) on a generated metadata file, with the regex
   pre-filter that skips literal_eval for items outside the 5-core reviews;
4. generate_synthetic at its default size.

Usage: python scripts/bench_download.py [--mb 256] [--images 600]
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mmsr_cli.download import DownloadOptions
from mmsr_cli.sources.amazon2014 import image_urls as meta_image_urls
from mmsr_cli.sources.fetch import fetch_file, fetch_images
from mmsr_cli.sources.synthetic import generate_synthetic


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(big: Path, image: bytes, latency: float, truncate_once: set[str]):
    size = big.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/img/"):
                time.sleep(latency)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
                return
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            stop = size if self.path not in truncate_once else size // 2
            truncate_once.discard(self.path)
            with open(big, "rb") as f:
                f.seek(start)
                left = stop - start
                while left > 0:
                    block = f.read(min(1 << 20, left))
                    self.wfile.write(block)
                    left -= len(block)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--images", type=int, default=600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-download-"))
    big = tmp / "source.bin"
    with open(big, "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1 << 20))
    truncate: set[str] = set()
    httpd, base = serve(big, b"\xff\xd8\xff" + os.urandom(20_000), latency=0.02, truncate_once=truncate)
    opts = DownloadOptions(backoff=0.0, retries=2)
    rss0 = peak_rss_mib()

    for label, path in (("full", "/a.bin"), ("dropped at 50%, resumed", "/b.bin")):
        if "resumed" in label:
            truncate.add(path)
        t = time.perf_counter()
        fetch_file(base + path, tmp / path.lstrip("/"), opts)
        dt = time.perf_counter() - t
        print(f"fetch_file {args.mb} MiB ({label}): {dt:.2f} s, {args.mb / dt:.0f} MiB/s, "
              f"peak RSS {peak_rss_mib():.0f} MiB (before {rss0:.0f})")

    for workers in (1, 8, 32):
        urls = {f"I{i}": f"{base}/img/{workers}-{i}.jpg" for i in range(args.images)}
        t = time.perf_counter()
        res = fetch_images(urls, tmp / f"images{workers}", DownloadOptions(workers=workers))
        dt = time.perf_counter() - t
        print(f"images: {res.ok} x 20 KB, 20 ms latency, --workers {workers}: {dt:.2f} s, {res.ok / dt:.0f} images/s")
    httpd.shutdown()

    n_meta, n_wanted = 200_000, 20_000
    meta = tmp / "meta.json.gz"
    with gzip.open(meta, "wt") as f:
        for i in range(n_meta):
            rec = {"asin": f"B{i:09d}", "title": f"Item {i} with a longish title", "categories": [["Beauty", "Makeup"]],
                   "imUrl": f"http://example.com/{i}.jpg", "related": {"also_bought": [f"B{j:09d}" for j in range(20)]}}
            f.write(repr(rec) + "\n")
    wanted = {f"B{i:09d}" for i in range(0, n_meta, n_meta // n_wanted)}
    t = time.perf_counter()
    urls, _ = meta_image_urls(meta, wanted)
    print(f"meta_image_urls: {n_meta:,} lines, {len(urls):,} wanted: {time.perf_counter() - t:.2f} s")

    t = time.perf_counter()
    info = generate_synthetic(tmp / "synthetic")
    print(f"generate_synthetic (default: {info.n_users} users, {info.n_items} items, {info.n_images} PNGs): "
          f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
