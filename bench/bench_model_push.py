"""The default build's model images pushed to a local registry: forge's push vs `skopeo copy
--preserve-digests` of the same OCI layouts, same registry (distribution, htpasswd), fresh storage
per run.

    .venv/bin/python bench/bench_model_push.py artifacts/smollm2-135m/images --rounds 3 [--append bench/RESULTS.md]

The images are the layouts `forge build recipes/smollm2-135m.yaml` leaves under
`artifacts/<recipe>/images/<variant>/<backend>/<gpu>/layout` (one uncompressed layer per model file).
Each tool pushes every image, one after another, as one child process (forge: `push_image` per
layout, as `forge push` does before attaching its referrers; skopeo: one `skopeo copy` per layout
from a shell), so start-up is counted for both. Runs alternate which tool goes first. Both must
arrive at the same manifest digests (checked).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.registry_server import running_registry  # noqa: E402

_FORGE_CHILD = """
import json, sys
from pathlib import Path
from forge.oci.registry import Credentials, RegistryOptions, push_image
host, user, password, *images = sys.argv[1:]
creds, out = Credentials(user, password), []
for item in images:
    layout, tag = item.rsplit("=", 1)
    r = push_image(Path(layout), f"{host}/smollm2:{tag}", source_tag=tag, credentials=creds, options=RegistryOptions())
    out.append({"tag": tag, "digest": r.digest, "bytes_uploaded": r.bytes_uploaded})
print(json.dumps(out))
"""


def images_under(root: Path) -> list[tuple[Path, str]]:
    """(layout, tag) of every model image below `root`, in path order."""
    found = []
    for index in sorted(root.glob("*/*/*/layout/index.json")):
        manifest = json.loads(index.read_text())["manifests"][0]
        found.append((index.parent, manifest["annotations"]["org.opencontainers.image.ref.name"]))
    return found


def blob_bytes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())


def run_forge(images: list[tuple[Path, str]], host: str, user: str, password: str) -> tuple[float, dict[str, str]]:
    argv = [sys.executable, "-c", _FORGE_CHILD, host, user, password, *(f"{lay}={tag}" for lay, tag in images)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"forge push failed:\n{done.stderr[-2000:]}")
    return seconds, {r["tag"]: r["digest"] for r in json.loads(done.stdout)}


def run_skopeo(images: list[tuple[Path, str]], host: str, creds: str) -> tuple[float, dict[str, str]]:
    # skopeo-copy(1): https://github.com/containers/skopeo/blob/main/docs/skopeo-copy.1.md
    lines = [
        shlex.join(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                f"oci:{lay}:{tag}",
                f"docker://{host}/smollm2:{tag}",
            ]
        )  # fmt: skip
        for lay, tag in images
    ]
    started = time.monotonic()
    done = subprocess.run(["bash", "-ec", "\n".join(lines)], capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"skopeo copy failed:\n{done.stderr[-2000:]}")
    digests = {}
    for _, tag in images:
        inspected = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", creds,
                                    f"docker://{host}/smollm2:{tag}"], capture_output=True, check=True)  # fmt: skip
        digests[tag] = "sha256:" + hashlib.sha256(inspected.stdout).hexdigest()
    return seconds, digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="artifacts/<recipe>/images of a default build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append", type=Path, help="append a section to this Markdown file")
    args = parser.parse_args()
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        raise SystemExit("needs skopeo and docker-registry (apt-get install $(cat .ci/apt-packages.txt))")
    images = images_under(args.images)
    if not images:
        raise SystemExit(f"{args.images}: no <variant>/<backend>/<gpu>/layout below it (run the default build)")
    total = sum(blob_bytes(lay) for lay, _ in images)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"forge": [], "skopeo --preserve-digests": []}
    digests: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-push-") as tmp:
        for round_no in range(args.rounds):
            order = ["forge", "skopeo --preserve-digests"][:: 1 if round_no % 2 == 0 else -1]
            for tool in order:
                with running_registry(Path(tmp) / f"r{round_no}-{tool.split()[0]}") as server:
                    if tool == "forge":
                        seconds, got = run_forge(images, server.host, server.username, server.password)
                    else:
                        seconds, got = run_skopeo(images, server.host, server.creds)
                times[tool].append(seconds)
                digests[tool] = got
                print(f"round {round_no + 1}: {tool}: {seconds:.2f} s ({total / seconds / (1 << 20):.0f} MiB/s)")
    load_after = os.getloadavg()
    same = digests["forge"] == digests["skopeo --preserve-digests"]
    print(f"digests identical: {same}")
    if not same:
        raise SystemExit("forge and skopeo pushed different manifests")
    if args.append:
        rows = "\n".join(
            f"| {tool} | {' / '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} | {total / min(ts) / (1 << 20):.0f} |"
            for tool, ts in times.items()
        )
        cpu = platform.processor() or platform.machine()

        def loads(values: tuple[float, ...]) -> str:
            return " / ".join(f"{x:.2f}" for x in values)

        section = f"""
## Model images of the default build: forge push vs skopeo copy ({datetime.date.today().isoformat()})

`{" ".join(["bench/bench_model_push.py", *sys.argv[1:]])}`, {platform.node()} ({os.cpu_count()} cores,
{cpu}, Python {platform.python_version()}). {len(images)} images, {total / (1 << 20):.0f} MiB of blobs, each
run to a fresh local `docker-registry` (htpasswd); both tools arrive at the same manifest digests. Load
average (1/5/15 min): {loads(load_before)} before, {loads(load_after)} after.

| tool | seconds per round | best | MiB/s (best) |
|---|---|---|---|
{rows}
"""
        with args.append.open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
