"""The errors forge turns into one-line messages and exit codes (see README, "Exit codes")."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRA = 3
EXIT_INTERNAL = 4  # a bug in forge: an exception that is none of the errors below


class ForgeError(Exception):
    """A failure the user can act on: printed as one line (or one block), never a traceback."""

    exit_code = EXIT_INFRA


class InputError(ForgeError):
    """Bad recipe, arguments or input files (exit 2). Messages start with the key path."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(ForgeError):
    """A validation gate failed (exit 1). Carries the build result so the report is still printed."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class InfraError(ForgeError):
    """Network, registry, server or missing-tool trouble (exit 3)."""

    exit_code = EXIT_INFRA
