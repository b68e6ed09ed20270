"""Image references and whose credentials go where: docker config.json entries (and credential
helpers) for exactly their host, FORGE_REGISTRY_USERNAME / PASSWORD for the registry forge pushes to."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from forge.errors import InfraError, InputError
from forge.oci import layout

# Docker Hub's names: `ubuntu` is `docker.io/library/ubuntu`, served from registry-1.docker.io.
_HUB_HOST = "registry-1.docker.io"


_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


# dist-spec "Pulling manifests": repository names are path components of this form.
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class Reference:
    """`host/repository[:tag][@digest]`, with Docker Hub short names expanded."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after `/manifests/`: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parses an image reference the way docker does: the first component is a registry host when
    it has a `.` or `:` or is `localhost`; otherwise the image is on Docker Hub."""
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        layout.check_digest(digest)
    tag = None
    name = rest
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = rest.rsplit(":", 1)
        layout.check_tag(tag)
    first, _, remainder = name.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = "docker.io", name
    if host in _HUB_ALIASES:
        host = _HUB_HOST
        if "/" not in repository:
            repository = f"library/{repository}"
    if not repository or not all(_REPO_COMPONENT.match(c) for c in repository.split("/")):
        raise InputError(f"image reference {text!r}: repository {repository!r} is not a valid name")
    return Reference(host, repository, tag, digest)


@dataclass(frozen=True)
class Credentials:
    """A registry login. The password is kept out of repr so it cannot leak into logs."""

    username: str
    password: str = field(repr=False)


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"


def canonical_host(host: str) -> str:
    """`docker.io`, `index.docker.io` … → `registry-1.docker.io`; other hosts lower-cased. Two
    names are the same registry only when these are equal (host and port)."""
    host = host.strip().lower()
    return _HUB_HOST if host in _HUB_ALIASES else host


def same_registry(a: str | None, b: str | None) -> bool:
    return bool(a and b) and canonical_host(a) == canonical_host(b)


def resolve_credentials(
    host: str,
    username: str | None = None,
    password: str | None = None,
    docker_config: Path | None = None,
    *,
    use_env: bool = True,
) -> Credentials | None:
    """Credentials for `host`, first found wins: explicit arguments, then FORGE_REGISTRY_USERNAME /
    FORGE_REGISTRY_PASSWORD, then docker's config.json entry for exactly this host (`auths`
    entries, then `credHelpers` / `credsStore` via `docker-credential-<name> get`). None means
    anonymous.

    The environment variables are one login for one registry, the one forge pushes to
    (`package.registry`): callers asking for any other host (a base image's, the image of a
    `forge verify` elsewhere) pass `use_env=False`, so that password never leaves for a third
    party. The registry client itself only reads them for the registry it pushes to."""
    if username is not None or password is not None:
        if not (username and password):
            raise InputError("registry credentials: give both a username and a password")
        return Credentials(username, password)
    if use_env:
        env_user = os.environ.get("FORGE_REGISTRY_USERNAME")
        env_password = os.environ.get("FORGE_REGISTRY_PASSWORD")
        if env_user or env_password:
            if not (env_user and env_password):
                raise InputError("FORGE_REGISTRY_USERNAME and FORGE_REGISTRY_PASSWORD must be set together")
            return Credentials(env_user, env_password)
    return _docker_config_credentials(host, docker_config or docker_config_path())


def credentials_for(host: str, push_registry: str | None) -> Credentials | None:
    """What forge sends to `host` when `push_registry` is the recipe's `package.registry`: the
    environment's login only there, docker's config.json entry for exactly `host` everywhere."""
    return resolve_credentials(host, use_env=same_registry(host, push_registry))


def _config_key_host(key: str) -> str:
    """`https://index.docker.io/v1/` → `index.docker.io`: config.json keys come in several forms."""
    return urlsplit(key if "://" in key else f"//{key}").netloc


def _docker_config_credentials(host: str, path: Path) -> Credentials | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: cannot be read as JSON") from None
    wanted = _HUB_ALIASES if host == _HUB_HOST else {host}
    for key, entry in (config.get("auths") or {}).items():
        if _config_key_host(key) not in wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InputError(f"{path}: auths[{key!r}].auth is not base64 of 'user:password'") from None
            if user and secret:
                return Credentials(user, secret)
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"])
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        server = _HUB_CONFIG_KEY if host == _HUB_HOST else host
        return _credential_helper(helper, server, path)
    return None


def _credential_helper(name: str, server: str, config_path: Path) -> Credentials | None:
    """Runs a docker credential helper (https://github.com/docker/docker-credential-helpers):
    `get` reads the server URL on stdin and prints {"Username", "Secret"}."""
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True, timeout=60)
    except FileNotFoundError:
        raise InfraError(f"credential helper {program} (set in {config_path}) is not installed") from None
    except subprocess.TimeoutExpired:
        raise InfraError(f"credential helper {program} did not answer within 60 s") from None
    if proc.returncode != 0:
        return None  # helpers exit non-zero for "no credentials for this server"
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise InfraError(f"credential helper {program} printed something other than its JSON answer") from None
    if user == "<token>":  # an identity token for the OAuth2 refresh flow, which forge does not speak
        return None
    return Credentials(user, secret)
