"""Connecting to Temporal with the one data converter every Mayfly process must share, and the
TLS, mTLS or API-key settings of a secured cluster or Temporal Cloud."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig
from temporalio.worker import UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from mayfly.config import ConfigError, TemporalSettings

DATA_CONVERTER: DataConverter = pydantic_data_converter

# The sandbox's restrictions stay (no clock, randomness or I/O from workflow code), but no module
# is imported again for each workflow: that re-import made up about half of a job history's
# replay (36.7 against 20.3 ms per 61-event history), paid at every workflow start and every
# replay after a cache eviction, thousands of times in a backlog. It is safe because no workflow
# module keeps mutable module-level state; the replay tests use the default, stricter sandbox.
WORKFLOW_RUNNER: WorkflowRunner = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
)

# The semaphore alone runs outside the sandbox. Under a stream of signals its continue-as-new is
# usually refused once (a signal arrived meanwhile) and the worker replays the whole run; the
# sandbox's per-activation cost doubled that replay (80 against 49 ms for a 441-event run, 208
# against 102 ms for 1,077 events, idle), and it is the pool's slowest task under a backlog.
# Its determinism is still checked in the sandbox: the replay tests run its recorded histories
# under the default, strict restrictions.
SEMAPHORE_WORKFLOW_RUNNER: WorkflowRunner = UnsandboxedWorkflowRunner()


def tls_config(settings: TemporalSettings) -> TLSConfig | bool:
    """What Client.connect takes as `tls`: False for plaintext, or the configured PEM material."""
    if not settings.uses_tls:
        return False
    try:
        return TLSConfig(
            server_root_ca_cert=settings.tls_ca_path.read_bytes() if settings.tls_ca_path else None,
            domain=settings.tls_server_name,
            client_cert=settings.tls_cert_path.read_bytes() if settings.tls_cert_path else None,
            client_private_key=settings.tls_key_path.read_bytes() if settings.tls_key_path else None,
        )
    except OSError as error:
        # Validated at start, but a mounted secret can vanish or lose permissions before the connect.
        raise ConfigError(f"temporal.tls_*: cannot read {error.filename}: {error.strerror}") from None


async def connect(settings: TemporalSettings, runtime: Runtime | None = None) -> Client:
    """Connect, or raise ConfigError with a message an operator can act on."""
    try:
        return await Client.connect(
            settings.address,
            namespace=settings.namespace,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            tls=tls_config(settings),
            data_converter=DATA_CONVERTER,
            runtime=runtime,
        )
    except RuntimeError as error:
        # The SDK reports connection, TLS handshake and auth failures as RuntimeError.
        hint = "" if settings.uses_tls else " (TLS is off: does the server require it? set temporal.tls_*)"
        raise ConfigError(
            f"cannot connect to Temporal at {settings.address} (namespace {settings.namespace!r}): "
            f"{error}{hint}"
        ) from None
