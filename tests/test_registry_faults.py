"""Pushes through a faulty network: bursts of 5xx and 429, dropped connections, lost answers,
stalls, throttling, corrupted bytes and a registry that stays down.

Every push goes through `tests/fault_proxy.py` to a real registry (distribution 2.8 on
loopback). A push must either publish exactly the built image (checked by pulling it back with
forge, which verifies every blob's sha256, and by `skopeo inspect`) or fail with InfraError
(exit 3) and a one-line message within a bounded time. It must never publish a manifest whose
blobs the registry does not hold intact.

What resuming can achieve on distribution 2.8 (see `forge/oci/registry/push.py`, `_upload_status`):
a connection dropped *between* two PATCH chunks resumes from the registry's `Range` and sends
every byte once; a PATCH cut part-way, or one whose answer was lost, leaves the client holding an
upload `_state` whose offset no longer matches the bytes on the registry's disk, so the registry
refuses the session and the blob starts over (the bytes already sent are wasted, at most one
blob's worth per drop). A dropped monolithic PUT is retried in chunks, so a second drop can resume.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest

from forge.errors import EXIT_INFRA, InfraError
from forge.oci.image import ImageConfig, ImageResult, build_image
from forge.oci.registry import Credentials, RegistryOptions, pull_image, push_image
from tests import registry_server
from tests.fault_proxy import Fault, FaultProxy
from tests.registry_server import RegistryServer, make_base_layout, require

registry = registry_server.registry  # distribution 2.8, htpasswd auth, one per module

CREDS = Credentials(registry_server.USERNAME, registry_server.PASSWORD)
MIB = 1 << 20
BLOB = 8 * MIB  # the model layer: eight chunks of CHUNK
CHUNK = 1 * MIB
FAST = RegistryOptions(backoff_s=0.01, resume_chunk_size=CHUNK, retries=4)
CHUNKED = RegistryOptions(backoff_s=0.01, chunk_size=CHUNK, retries=4)
UPLOAD = r"/blobs/uploads/"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageResult:
    """base (two small layers) + an 8 MiB model layer + a config layer."""
    root = tmp_path_factory.mktemp("faults")
    base = make_base_layout(root / "base")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(os.urandom(BLOB - 4096))
    return build_image(f"oci:{base}:latest", model, None, ImageConfig(), root / "oci", "v1")


def big_layer(image: ImageResult) -> int:
    return max(layer.size for layer in image.layers)


def manifest_blob_bytes(image: ImageResult) -> int:
    manifest = json.loads((image.layout / "blobs" / "sha256" / image.digest.removeprefix("sha256:")).read_bytes())
    return manifest["config"]["size"] + sum(d["size"] for d in manifest["layers"])


def push(proxy: FaultProxy, image: ImageResult, repo: str, options: RegistryOptions):
    return push_image(image.layout, f"{proxy.host}/faults/{repo}:v1", credentials=CREDS, options=options)


def skopeo_digest(server: RegistryServer, repo: str) -> str | None:
    require("skopeo")
    done = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", "--tls-verify=false", "--creds", server.creds,
         f"docker://{server.host}/faults/{repo}:v1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return json.loads(done.stdout)["Digest"] if done.returncode == 0 else None


def assert_published(server: RegistryServer, repo: str, image: ImageResult, tmp_path: Path) -> None:
    """The registry serves exactly the built image: forge pulls it back (verifying every blob's
    sha256 on the way in) and skopeo reports the same manifest digest."""
    pulled = pull_image(f"{server.host}/faults/{repo}:v1", tmp_path / f"pulled-{repo}", credentials=CREDS,
                        options=RegistryOptions(retries=0))  # fmt: skip
    assert pulled.digest == image.digest
    assert skopeo_digest(server, repo) == image.digest


# ---------------------------------------------------------------- bursts of errors


@pytest.mark.parametrize(
    ("method", "path", "status", "burst", "options"),
    [
        ("GET", r"^/v2/$", 503, 3, FAST),  # the auth probe
        ("HEAD", r"/blobs/sha256:", 503, 3, FAST),
        ("POST", UPLOAD, 502, 3, FAST),
        ("PUT", UPLOAD, 500, 3, FAST),  # the monolithic blob PUT
        ("PATCH", UPLOAD, 503, 3, CHUNKED),
        ("PUT", r"/manifests/", 504, 3, FAST),
        ("PUT", r"/manifests/", 429, 2, FAST),
    ],
    ids=["probe-503", "head-503", "post-502", "put-blob-500", "patch-503", "manifest-504", "manifest-429"],
)
def test_bursts_of_errors_are_retried(
    registry: RegistryServer, image: ImageResult, tmp_path: Path, method: str, path: str, status: int, burst: int,
    options: RegistryOptions,
) -> None:  # fmt: skip
    repo = f"burst-{method.lower()}-{status}"
    with FaultProxy(registry.host, [Fault("status", method, path, times=burst, status=status)]) as proxy:
        result = push(proxy, image, repo, options)
    assert len(proxy.log.faults()) == burst
    assert result.digest == image.digest
    assert_published(registry, repo, image, tmp_path)


def test_retry_after_is_honoured(registry: RegistryServer, image: ImageResult) -> None:
    """429 with `Retry-After: 1` (RFC 9110 §10.2.3): the next attempt waits at least a second,
    although the configured backoff is 10 ms."""
    started = time.monotonic()
    with FaultProxy(registry.host, [Fault("status", "GET", r"^/v2/$", status=429, retry_after="1")]) as proxy:
        push(proxy, image, "retry-after-wait", FAST)
    assert time.monotonic() - started >= 1.0


# ---------------------------------------------------------------- dropped connections on a large blob


def test_drop_between_chunks_resumes_without_resending(
    registry: RegistryServer, image: ImageResult, tmp_path: Path
) -> None:
    """Connection reset before the 4th PATCH reaches the registry: the upload goes on from the
    registry's Range, and each byte of the 8 MiB layer crosses exactly once."""
    fault = Fault("reset", "PATCH", UPLOAD, skip=3, min_length=CHUNK)
    with FaultProxy(registry.host, [fault]) as proxy:
        result = push(proxy, image, "between-chunks", CHUNKED)
    assert fault.applied == 1 and result.retries == 1
    assert proxy.log.body_bytes("PATCH") == big_layer(image)
    assert_published(registry, "between-chunks", image, tmp_path)


def test_patch_cut_midway_starts_the_blob_over(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """Cut 300 kB into the 4th PATCH: distribution 2.8 discards the session, so the blob is sent
    again from byte 0. The waste is bounded by what was sent before the cut."""
    fault = Fault("cut_body", "PATCH", UPLOAD, skip=3, after_bytes=300_000, min_length=CHUNK)
    with FaultProxy(registry.host, [fault]) as proxy:
        result = push(proxy, image, "mid-chunk", CHUNKED)
    assert fault.applied == 1 and result.retries >= 1
    sent = proxy.log.body_bytes("PATCH")
    wasted = sent - big_layer(image)
    assert 0 < wasted <= 3 * CHUNK + 300_000, f"{wasted} bytes re-sent"
    assert_published(registry, "mid-chunk", image, tmp_path)


def test_lost_patch_answer_is_recovered(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """The registry took the whole 4th chunk but its answer was lost. The client's upload state
    is one chunk behind the registry's, which distribution refuses; forge starts that blob over
    and the pushed image is still exactly the built one."""
    fault = Fault("lose_answer", "PATCH", UPLOAD, skip=3, min_length=CHUNK)
    with FaultProxy(registry.host, [fault]) as proxy:
        result = push(proxy, image, "lost-answer", CHUNKED)
    assert fault.applied == 1 and result.retries >= 1
    assert big_layer(image) <= proxy.log.body_bytes("PATCH") <= 2 * big_layer(image)
    assert_published(registry, "lost-answer", image, tmp_path)


def test_dropped_put_then_dropped_chunk(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """Default mode: one PUT per blob. Cut 2 MiB into the big PUT: the blob is resent in 1 MiB
    chunks; reset before the 3rd of those: it resumes. Bytes of the big blob that crossed:
    2 MiB wasted, then the 8 MiB once."""
    faults = [
        Fault("cut_body", "PUT", UPLOAD, after_bytes=2 * MIB, min_length=2 * CHUNK),
        Fault("reset", "PATCH", UPLOAD, skip=2, min_length=CHUNK),
    ]
    with FaultProxy(registry.host, faults) as proxy:
        result = push(proxy, image, "put-then-patch", FAST)
    assert [f.applied for f in faults] == [1, 1] and result.retries == 2
    assert proxy.log.body_bytes("PATCH") == big_layer(image)
    assert_published(registry, "put-then-patch", image, tmp_path)


def test_lost_put_answer_is_not_resent(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """The registry committed the big blob but its 201 was lost: the retry's HEAD finds the blob
    and nothing is sent again."""
    fault = Fault("lose_answer", "PUT", UPLOAD, min_length=2 * CHUNK)
    with FaultProxy(registry.host, [fault]) as proxy:
        result = push(proxy, image, "lost-put", FAST)
    assert fault.applied == 1 and result.retries == 1
    assert proxy.log.body_bytes("PUT", UPLOAD) == manifest_blob_bytes(image)  # each blob once
    assert proxy.log.body_bytes("PATCH") == 0
    assert_published(registry, "lost-put", image, tmp_path)


# ---------------------------------------------------------------- slow and corrupting networks


def test_slow_registry(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """Every answer 0.2 s late and uploads throttled to 16 MiB/s: slow, not failed."""
    faults = [Fault("throttle", "PUT|PATCH", UPLOAD, times=None, bytes_per_s=16 * MIB, min_length=MIB),
              Fault("stall", times=None, seconds=0.2)]  # fmt: skip
    started = time.monotonic()
    with FaultProxy(registry.host, faults) as proxy:
        result = push(proxy, image, "slow", FAST)
    assert time.monotonic() - started >= BLOB / (16 * MIB)
    assert result.retries == 0
    assert_published(registry, "slow", image, tmp_path)


def test_stall_longer_than_the_timeout_is_retried(registry: RegistryServer, image: ImageResult, tmp_path: Path) -> None:
    """The first manifest PUT hangs for 3 s against a 1 s socket timeout: timed out, retried."""
    options = RegistryOptions(backoff_s=0.01, timeout_s=1.0)
    with FaultProxy(registry.host, [Fault("stall", "PUT", r"/manifests/", seconds=3.0)]) as proxy:
        result = push(proxy, image, "stall", options)
    assert result.digest == image.digest
    assert_published(registry, "stall", image, tmp_path)


def test_corrupted_blob_is_refused_and_nothing_is_tagged(registry: RegistryServer, image: ImageResult) -> None:
    """One flipped bit in the big blob: the registry's digest check refuses it (DIGEST_INVALID).
    The push may retry, but it must not publish the tag unless every blob arrived intact."""
    fault = Fault("corrupt", "PUT", UPLOAD, min_length=2 * CHUNK, after_bytes=12345, times=None)
    with FaultProxy(registry.host, [fault]) as proxy:
        with pytest.raises(InfraError, match="DIGEST_INVALID"):
            push(proxy, image, "corrupt", FAST)
    assert not any(e.method == "PUT" and "/manifests/" in e.path for e in proxy.log.entries)
    assert skopeo_digest(registry, "corrupt") is None


# ---------------------------------------------------------------- a registry that stays down


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", times=None, status=503),
        Fault("reset", times=None),
        Fault("status", "PUT|PATCH|POST", UPLOAD, times=None, skip=2, status=502),  # goes down mid-push
        Fault("stall", times=None, seconds=5.0),  # accepts, never answers in time
    ],
    ids=["503-forever", "reset-forever", "down-mid-push", "black-hole"],
)
def test_registry_that_stays_down_fails_within_bounded_time(
    registry: RegistryServer, image: ImageResult, fault: Fault
) -> None:
    options = RegistryOptions(retries=3, backoff_s=0.05, timeout_s=0.5)
    # Worst case: every attempt of one request times out, with backoff between: 4 × 0.5 s + 0.35 s,
    # once for the auth probe and at most once more for a blob chain; plus process overhead.
    bound = 2 * (4 * options.timeout_s + 0.05 * (1 + 2 + 4)) + 3.0
    started = time.monotonic()
    with FaultProxy(registry.host, [fault]) as proxy:
        with pytest.raises(InfraError) as caught:
            push(proxy, image, "down", options)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_INFRA
    assert message.startswith(f"registry {proxy.host}: ") and "\n" not in message, message
    assert "after 4 attempts" in message, message
    assert elapsed < bound, f"gave up after {elapsed:.1f} s (bound {bound:.1f} s)"
    assert registry.password not in message


def test_default_options_give_up_in_bounded_time(registry: RegistryServer, image: ImageResult) -> None:
    """With forge's defaults (4 retries, backoff 0.5 s doubling) a registry answering 503 to
    everything is given up on after 0.5 + 1 + 2 + 4 = 7.5 s of waiting."""
    started = time.monotonic()
    with FaultProxy(registry.host, [Fault("status", times=None, status=503)]) as proxy:
        with pytest.raises(InfraError, match=r"gave up after 5 attempts"):
            push(proxy, image, "down-default", RegistryOptions())
    assert 7.5 <= time.monotonic() - started < 15
    assert len(proxy.log.entries) == 5


def test_unreachable_registry_fails_on_the_connect_timeout(image: ImageResult) -> None:
    """A host that never completes the TCP handshake (here: a listener whose one-slot backlog is
    full, so the kernel drops further SYNs) fails each attempt after `connect_timeout_s`, not
    after the 300 s read timeout."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname())  # takes the only backlog slot
    options = RegistryOptions(retries=1, backoff_s=0.01, connect_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(InfraError, match="after 2 attempts"):
            push_image(image.layout, f"127.0.0.1:{listener.getsockname()[1]}/x/y:v1", options=options)
    finally:
        filler.close()
        listener.close()
    assert time.monotonic() - started < 2 * 0.5 + 5.0


# ---------------------------------------------------------------- random faults


def random_faults(rng: random.Random) -> list[Fault]:
    """One to three faults of any kind on random requests of the push."""
    faults = []
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["reset", "cut_body", "status", "lose_answer", "stall"])
        method, path = rng.choice([("PUT", UPLOAD), ("PATCH", UPLOAD), ("POST", UPLOAD), ("HEAD", "/blobs/"),
                                   ("PUT", "/manifests/"), ("GET", "^/v2/$")])  # fmt: skip
        faults.append(Fault(action, method, path, skip=rng.randint(0, 3), times=rng.randint(1, 2),
                            after_bytes=rng.randint(1, 3 * MIB), status=rng.choice([500, 502, 503, 429]),
                            seconds=0.05))  # fmt: skip
    return faults


def test_random_faults_never_publish_a_wrong_image(
    registry: RegistryServer, image: ImageResult, tmp_path: Path
) -> None:
    """Eight pushes, each under one to three random faults: each either publishes exactly the
    built image or fails with a one-line InfraError; the tag never points at anything else."""
    seed = int(os.environ.get("FORGE_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    outcomes = []
    for i in range(8):
        repo = f"random-{seed}-{i}"
        faults = random_faults(rng)
        options = rng.choice([FAST, CHUNKED])
        with FaultProxy(registry.host, faults) as proxy:
            try:
                push(proxy, image, repo, options)
                outcomes.append("published")
                assert_published(registry, repo, image, tmp_path)
            except InfraError as error:
                outcomes.append("refused")
                assert "\n" not in str(error), (seed, faults, error)
                assert skopeo_digest(registry, repo) in (None, image.digest), (seed, faults)
    assert outcomes.count("published") >= 1, (seed, outcomes)
