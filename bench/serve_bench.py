"""phototag's server against the tutorial reference, back to back on this machine.

For each photo set (phone-size and thumbnails) and each server (phototag with its defaults:
people tags on, four regions; phototag with PHOTOTAG_PEOPLE=off; with PHOTOTAG_REGIONS=0; the
reference in its two styles, threaded and async, see bench/reference_server.py): throughput,
p50/p99 latency and server CPU per photo under load (wrk, concurrency 16, a rotating set of
distinct photos), p50 of single requests on an idle server, peak RSS; then the ratios. Also the
physical ceiling (decode and network time per photo, measured in this process) and phototag's
tag quality against a full-precision, full-decode forward pass, on the shipped photos and on
both sets.

    make bench-serve          # or: .venv/bin/python bench/serve_bench.py --duration 20

Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import ANTS_BEES, build_sets  # noqa: E402

LOADGEN = REPO / "bench" / "loadgen.lua"
PEOPLE_OFF = "phototag-people-off"  # the server's defaults but PHOTOTAG_PEOPLE=off
REGIONS_OFF = "phototag-regions-0"  # the server's defaults but PHOTOTAG_REGIONS=0


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    tag_path: str
    port: int
    process: subprocess.Popen | None = None
    results: dict[str, dict] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: Server, timeout: float = 180.0) -> None:
    server.process = subprocess.Popen(
        server.command, cwd=REPO, env={**os.environ, **server.env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.process.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(server.url(server.ready_path), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} was not ready within {timeout:.0f} s")


def stop(server: Server) -> int:
    """SIGTERM, wait; return the peak RSS (kB) the kernel recorded for the process."""
    peak_kb = peak_rss_kb(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    return peak_kb


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def wrk(server: Server, listing: Path, threads: int, connections: int, seconds: int) -> dict:
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s",
        "-s", str(LOADGEN), server.url(server.tag_path), "--", str(listing),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    stats = json.loads(out.strip().splitlines()[-1])
    stats["throughput"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["errors"] = sum(v for k, v in stats.items() if k.startswith("errors_"))
    return stats


def run_server(server: Server, sets: dict[str, Path], args: argparse.Namespace) -> None:
    start(server)
    for set_name, listing in sets.items():
        wrk(server, listing, 1, 2, 3)  # warm-up: first requests pay for lazy initialisation
        idle = wrk(server, listing, 1, 1, args.idle_seconds)
        cpu_before = cpu_seconds(server.process.pid)
        loaded = wrk(server, listing, 2, args.concurrency, args.duration)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        server.results[set_name] = {
            "throughput": loaded["throughput"], "p50_ms": loaded["p50_us"] / 1e3,
            "p99_ms": loaded["p99_us"] / 1e3, "errors": loaded["errors"],
            "requests": loaded["requests"], "idle_p50_ms": idle["p50_us"] / 1e3,
            "cpu_ms_per_photo": 1e3 * cpu / max(1, loaded["requests"]),
        }  # fmt: skip
        r = server.results[set_name]
        print(f"  {server.name:15s} {set_name:5s} {r['throughput']:7.1f} photos/s  "
              f"p50 {r['p50_ms']:7.0f} ms  p99 {r['p99_ms']:7.0f} ms  "
              f"idle p50 {r['idle_p50_ms']:6.0f} ms  CPU {r['cpu_ms_per_photo']:5.1f} ms/photo  "
              f"errors {r['errors']}", flush=True)  # fmt: skip
    if server.name == "phototag":
        shipped = {"shipped": ANTS_BEES} if ANTS_BEES.is_dir() else {}
        server.results["quality"] = {
            name: tag_quality(server, photo_paths(folder_or_listing))
            for name, folder_or_listing in {**shipped, **sets}.items()
        }  # fmt: skip
    server.results["peak_rss_mb"] = stop(server) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def photo_paths(folder_or_listing: Path) -> list[Path]:
    if folder_or_listing.is_dir():
        return sorted(p for p in folder_or_listing.rglob("*") if p.is_file())
    return [Path(p) for p in folder_or_listing.read_text().split()]


def tag_quality(server: Server, paths: list[Path]) -> dict:
    """Served probabilities vs a float32 forward pass on the fully decoded photo."""
    import torch

    from model.checkpoint import load
    from model.imageio import open_rgb
    from model.preprocess import build_eval_transform

    checkpoint = load(server.env["PHOTOTAG_CHECKPOINT"])
    net = checkpoint.build_model()
    transform = build_eval_transform(checkpoint.card.preprocess)
    same_top1, diffs = 0, []
    for path in paths:
        with torch.inference_mode():
            exact = net(transform(open_rgb(str(path))).unsqueeze(0)).softmax(1)[0]
        served = torch.tensor(list(post_all(server, path).values()))
        same_top1 += int(served.argmax() == exact.argmax())
        diffs.append(float((served - exact).abs().max()))
    diffs.sort()
    return {
        "photos": len(paths), "top1_agreement": same_top1 / len(paths),
        "max_abs_diff": diffs[-1], "p99_max_abs_diff": diffs[int(0.99 * (len(diffs) - 1))],
        "mean_max_abs_diff": sum(diffs) / len(diffs),
        "photos_within_0_02": sum(d <= 0.02 for d in diffs) / len(diffs),
    }  # fmt: skip


def ceiling(sets: dict[str, Path], checkpoint: Path) -> dict[str, dict]:
    """The physical ceiling on this machine: per photo, the decode + resize time (one thread,
    as phototag's decode threads do it) and the network time (as phototag's inference thread
    runs it, batches of 8), and the photos/s that all cores would give with nothing else to
    do: no HTTP, no parsing, perfect overlap."""
    import statistics

    import torch

    from app.settings import Settings
    from model.runtime import RuntimeChoice
    from model.tagger import Tagger

    settings = Settings(_env_file=None)
    threads = torch.get_num_threads()
    # one network thread, as phototag's inference thread on 2 cores
    choice = RuntimeChoice.resolve("cpu", settings.backend, settings.autocast, threads=1)
    tagger = Tagger.load(checkpoint, choice)
    batch = torch.zeros(8, 3, tagger.card.preprocess.crop, tagger.card.preprocess.crop,
                        dtype=torch.uint8)  # fmt: skip
    network_s = min(timed(tagger.probabilities, batch) for _ in range(10)) / len(batch)
    cores = len(os.sched_getaffinity(0))

    def prepare(data: bytes) -> float:
        started = time.perf_counter()
        tagger.pixels(data, max_pixels=settings.max_pixels, reducing_gap=settings.jpeg_reducing_gap)
        return time.perf_counter() - started

    result = {}
    for name, listing in sets.items():
        photos = [p.read_bytes() for p in photo_paths(listing)]
        decode_s = statistics.median(min(prepare(d), prepare(d)) for d in photos)
        result[name] = {
            "decode_ms": 1e3 * decode_s, "network_ms": 1e3 * network_s, "cores": cores,
            "photos_per_s": cores / (decode_s + network_s), "backend": tagger.backend,
        }  # fmt: skip
        r = result[name]
        print(f"  ceiling {name}: decode+resize {r['decode_ms']:.1f} ms + network "
              f"{r['network_ms']:.1f} ms ({tagger.backend}) per photo -> "
              f"{r['photos_per_s']:.1f} photos/s on {cores} cores", flush=True)  # fmt: skip
    torch.set_num_threads(threads)
    return result


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def post_all(server: Server, path: Path) -> dict[str, float]:
    boundary = "qualitycheckboundary"
    body = io.BytesIO()
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
               f'filename="{path.name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode())  # fmt: skip
    body.write(path.read_bytes())
    body.write(f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        server.url(server.tag_path + "?all=true&top_k=1"), data=body.getvalue(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)["results"][0]["probabilities"]


def report(servers: list[Server], set_names: list[str], limits: dict[str, dict]) -> str:
    ours = servers[0]
    people_off = next((s for s in servers if s.name == PEOPLE_OFF), None)
    references = [s for s in servers[1:] if not s.name.startswith("phototag")]
    lines = [
        "| set | server | photos/s | p50 ms | p99 ms | idle p50 ms | CPU ms/photo "
        "| peak RSS MB | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for set_name in set_names:
        for server in servers:
            r = server.results[set_name]
            lines.append(
                f"| {set_name} | {server.name} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['idle_p50_ms']:.0f} | {r['cpu_ms_per_photo']:.1f} | "
                f"{server.results['peak_rss_mb']:.0f} | {r['errors']} |"
            )
    lines.append("")
    for set_name in set_names:
        a = ours.results[set_name]
        for reference in references:
            b = reference.results[set_name]
            lines.append(
                f"{set_name} vs {reference.name}: "
                f"throughput x{ratio(a['throughput'], b['throughput'])}, "
                f"p50 x{ratio(b['p50_ms'], a['p50_ms'])} faster, "
                f"idle p50 {a['idle_p50_ms']:.0f} vs {b['idle_p50_ms']:.0f} ms"
            )  # fmt: skip
        if people_off is not None:
            off = people_off.results[set_name]["throughput"]
            lines.append(
                f"{set_name}: people tags on keep {a['throughput'] / off:.0%} of the people-off "
                f"throughput ({a['throughput']:.1f} against {off:.1f} photos/s)"
            )
        c = limits[set_name]
        lines.append(
            f"{set_name} ceiling: decode+resize {c['decode_ms']:.1f} ms + network "
            f"{c['network_ms']:.1f} ms per photo = {c['photos_per_s']:.1f} photos/s on "
            f"{c['cores']} cores; phototag reaches {a['throughput'] / c['photos_per_s']:.0%} of it"
        )
    lines.append("")
    for set_name, q in ours.results["quality"].items():
        lines.append(
            f"quality, {set_name} ({q['photos']} photos): top-1 equals the full-decode float32 "
            f"pass on {q['top1_agreement']:.1%}; largest probability difference "
            f"{q['max_abs_diff']:.4f} (p99 {q['p99_max_abs_diff']:.4f}, mean of per-photo max "
            f"{q['mean_max_abs_diff']:.4f}; {q['photos_within_0_02']:.1%} of photos within 0.02)"
        )
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "inf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per run")
    parser.add_argument("--idle-seconds", type=int, default=8, help="seconds of single requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=40, help="distinct photos per set")
    parser.add_argument("--sets", default="phone,thumb")
    parser.add_argument(
        "--servers",
        default=f"phototag,{PEOPLE_OFF},{REGIONS_OFF},reference,reference-async",
        help="which servers to load",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("serve_bench needs wrk: apt-get install wrk")
    photos = build_sets(args.out / "photos", args.count)
    sets = {name: args.out / "photos" / name / "list.txt" for name in args.sets.split(",")}
    assert all(name in photos for name in sets)
    checkpoint = args.out / "default.safetensors"
    if not checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(checkpoint)
    print("physical ceiling (this process, nothing else running):", flush=True)
    limits = ceiling(sets, checkpoint)
    python = sys.executable
    ours = [
        Server(name, [python, "-m", "app"], {
            "PHOTOTAG_CHECKPOINT": str(checkpoint), "PHOTOTAG_HOST": "127.0.0.1",
            "PHOTOTAG_PORT": str(port := free_port()), "PHOTOTAG_LOG_LEVEL": "warning",
            "PHOTOTAG_PEOPLE": people, "PHOTOTAG_REGIONS": regions,
        }, "/readyz", "/v1/tags", port)
        for name, people, regions in (
            ("phototag", "on", "4"), (PEOPLE_OFF, "off", "4"), (REGIONS_OFF, "on", "0"),
        )
    ]  # fmt: skip
    servers = ours + [
        Server(name, [python, "bench/reference_server.py", "--style", style, "--port",
               str(port := free_port())], {"PYTHONPATH": str(REPO)}, "/health", "/predict", port)
        for name, style in (("reference", "threaded"), ("reference-async", "async"))
    ]  # fmt: skip
    servers = [s for s in servers if s.name in args.servers.split(",")]
    for server in servers:
        print(f"{server.name}: {' '.join(server.command[1:])}", flush=True)
        run_server(server, sets, args)
    text = report(servers, list(sets), limits)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_bench.json").write_text(json.dumps(
        {**{s.name: s.results for s in servers}, "ceiling": limits, "args": vars(args)},
        indent=2, default=str))  # fmt: skip
    (args.out / "serve_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
