"""Push throughput of forge vs `skopeo copy` of the same OCI layout to the same local registry
(distribution 2.8, htpasswd auth, fresh storage per run), and forge's peak RSS while pushing.

    .venv/bin/python bench/bench_push.py --gib 4 --rounds 2 [--append bench/RESULTS.md]

The model is `--files` files of random bytes (a 64 MiB random block repeated, different per
file, so no two layers share a digest). Each push runs as a child process and its peak RSS comes
from `os.wait4`; throughput is blob bytes over the child's wall time, start-up included for both
tools. Runs alternate skopeo/forge so neither always gets the warmer page cache.

skopeo is run twice per round: with `--preserve-digests` (uploads the same uncompressed blobs as
forge: the like-for-like comparison) and with its defaults, which gzip uncompressed layers on the
fly when the destination is a registry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from forge.oci.image import ImageConfig, build_image  # noqa: E402
from tests.registry_server import make_base_layout, running_registry  # noqa: E402

_BLOCK = 64 << 20

_FORGE_CHILD = """
import json, sys
from pathlib import Path
from forge.oci.registry import Credentials, RegistryOptions, push_image
layout, ref, user, password, chunk, parallel = sys.argv[1:7]
options = RegistryOptions(chunk_size=int(chunk), parallel=int(parallel))
creds = Credentials(user, password)
r = push_image(Path(layout), ref, source_tag="bench", credentials=creds, options=options)
print(json.dumps({"digest": r.digest, "bytes_uploaded": r.bytes_uploaded, "seconds": r.seconds}))
"""


@dataclass
class Run:
    tool: str
    seconds: float
    max_rss_mib: float
    output: str


def make_model(directory: Path, total_bytes: int, files: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // files
    for i in range(files):
        block = os.urandom(_BLOCK)
        with open(directory / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            written = 0
            while written < per_file:
                piece = block[: min(_BLOCK, per_file - written)]
                f.write(piece)
                written += len(piece)


# Peak RSS via a small fork-exec wrapper: Linux folds the pre-exec address space into
# ru_maxrss, and subprocess's vfork/posix_spawn would make that the (large) parent's, so the
# child is forked from a fresh interpreter of ~10 MiB and its own ru_maxrss read with wait4.
_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(tool: str, argv: list[str], work: Path) -> Run:
    """Runs a command, returning its wall time and peak RSS (ru_maxrss is in KiB on Linux)."""
    rss_file = work / "maxrss"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *argv], capture_output=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return Run(tool, seconds, int(rss_file.read_text()) / 1024, proc.stdout.decode())


def push_forge(layout: Path, host: str, user: str, password: str, chunk: int, parallel: int) -> Run:
    ref = f"{host}/bench/forge:bench"
    argv = [sys.executable, "-c", _FORGE_CHILD, str(layout), ref, user, password, str(chunk), str(parallel)]
    return run_child("forge", argv, layout.parent)


def push_skopeo(layout: Path, host: str, creds: str, preserve: bool) -> Run:
    argv = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds,
    ]
    if preserve:
        argv.append("--preserve-digests")
    argv += [f"oci:{layout}:bench", f"docker://{host}/bench/skopeo:bench"]
    return run_child("skopeo --preserve-digests" if preserve else "skopeo (default: gzip)", argv, layout.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="total model size in GiB")
    parser.add_argument("--files", type=int, default=4, help="model files (one layer each)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-mib", type=int, default=0, help="forge chunk size; 0: one PUT per blob")
    parser.add_argument("--parallel", type=int, default=4, help="forge blobs in flight")
    parser.add_argument("--no-skopeo-gzip", action="store_true", help="skip skopeo's default (gzip) mode")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "forge-bench-push")
    parser.add_argument("--append", type=Path, help="append a Markdown section to this file")
    args = parser.parse_args()

    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        raise SystemExit("needs skopeo and docker-registry (apt-get install $(cat .ci/apt-packages.txt))")
    load_before = _loadavg()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        total = int(args.gib * (1 << 30))
        started = time.monotonic()
        make_model(work / "model", total, args.files)
        make_base_layout(work / "base")
        generated = time.monotonic()
        image = build_image(f"oci:{work / 'base'}:latest", work / "model", None, ImageConfig(), work / "oci", "bench")
        built = time.monotonic()
        manifest = json.loads((work / "oci/blobs/sha256" / image.digest.removeprefix("sha256:")).read_bytes())
        blob_bytes = manifest["config"]["size"] + sum(d["size"] for d in manifest["layers"])
        layer_rate = total / 2**20 / (built - generated)
        print(f"model {total / 2**30:.2f} GiB, {args.files} files, generated in {generated - started:.1f} s; "
              f"layers written+hashed in {built - generated:.1f} s ({layer_rate:.0f} MiB/s)")  # fmt: skip

        runs: list[Run] = []
        tools = ["skopeo-preserve", "forge"] + ([] if args.no_skopeo_gzip else ["skopeo-gzip"])
        for round_no in range(args.rounds):
            order = tools if round_no % 2 == 0 else list(reversed(tools))
            for tool in order:
                reg_dir = work / f"registry-{round_no}-{tool}"
                with running_registry(reg_dir) as server:
                    if tool == "forge":
                        run = push_forge(
                            work / "oci", server.host, server.username, server.password,
                            args.chunk_mib << 20, args.parallel,
                        )  # fmt: skip
                        assert json.loads(run.output)["digest"] == image.digest
                    else:
                        run = push_skopeo(work / "oci", server.host, server.creds, tool == "skopeo-preserve")
                runs.append(run)
                shutil.rmtree(reg_dir, ignore_errors=True)
                rate = blob_bytes / 2**20 / run.seconds
                print(f"round {round_no + 1} {run.tool:26s} {run.seconds:7.1f} s {rate:7.0f} MiB/s  "
                      f"peak RSS {run.max_rss_mib:6.0f} MiB", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(tool: str) -> Run:
        return min((r for r in runs if r.tool == tool), key=lambda r: r.seconds)

    forge_best = best("forge")
    skopeo_best = best("skopeo --preserve-digests")
    ratio = skopeo_best.seconds / forge_best.seconds
    forge_rss = max(r.max_rss_mib for r in runs if r.tool == "forge")
    summary = (
        f"forge vs skopeo --preserve-digests (best of {args.rounds}): {ratio:.2f}x throughput; "
        f"forge peak RSS {forge_rss:.0f} MiB"
    )
    print(summary)
    if args.append:
        command = " ".join(["bench/bench_push.py", *sys.argv[1:]])
        lines = [
            f"\n## Registry push: forge vs skopeo ({datetime.date.today().isoformat()})\n",
            f"- Machine: 2-core CPU sandbox, 24 GiB ({platform.processor() or platform.machine()}); "
            f"date: {subprocess.run(['date'], capture_output=True, text=True).stdout.strip()}",
            f"- Command: `.venv/bin/python {command}`",
            f"- Load average (1/5/15 min) before → after: {load_before} → {_loadavg()} "
            "(the sandbox is shared with other jobs; runs alternate tools so both see the same noise)",
            f"- Image: tiny base + {args.files} model layers, {blob_bytes / 2**30:.2f} GiB of blobs, "
            "uncompressed; "
            f"registry: distribution {_registry_version()} on 127.0.0.1 (htpasswd, fresh storage per run); "
            f"forge: {f'{args.chunk_mib} MiB chunks' if args.chunk_mib else 'one PUT per blob'}, "
            f"{args.parallel} blobs in parallel",
            "",
            "| run | tool | seconds | MiB/s | peak RSS MiB |",
            "|---|---|---|---|---|",
        ]
        for i, r in enumerate(runs):
            rate = blob_bytes / 2**20 / r.seconds
            lines.append(f"| {i + 1} | {r.tool} | {r.seconds:.1f} | {rate:.0f} | {r.max_rss_mib:.0f} |")
        lines += ["", f"**{summary}** (goal: ≥ 1.0x, ≤ 256 MiB).", ""]
        with open(args.append, "a") as f:
            f.write("\n".join(lines))


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _registry_version() -> str:
    out = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.split()
    return out[-1] if out else "?"


if __name__ == "__main__":
    main()
