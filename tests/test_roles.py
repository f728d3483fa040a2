"""Who may do what: the broker users of scripts/broker-roles.sh and the Redis users of scripts/redis-roles.sh.

The broker users live in a virtual host of this module's own, under a user-name prefix of its own, so the real
``sfx-*`` users and other tests are never touched; users, virtual host and Redis ACL users are deleted at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import amqp
import kombu
import pytest
import redis

from libs.contracts.messages import (
    CancelRequest,
    JobSpec,
    JobState,
    JobStatus,
    Message,
    ReprocessRequest,
    RunManifest,
    decode_message,
)
from libs.contracts.settings import Settings
from libs.runtime.bus import Outgoing, Publisher, PublishError, Topology, body_bytes, connect, message_headers, running
from libs.runtime.service import CredentialsError, check_credentials
from libs.runtime.state import LiveState
from libs.simulator.results import make_frame_result
from services.dispatcher.backends import BackendJobStatus, RunState
from services.dispatcher.service import Dispatcher, make_consumers
from tests.support.namespace import AMQP_URL, REDIS_URL, make_settings, rabbitmqctl, settings_environment
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
ROLES = ("service", "operator", "subscriber")

pytestmark = pytest.mark.slow  # users and vhosts made with rabbitmqctl, services started as processes


@dataclass(frozen=True)
class BrokerRoles:
    """The three broker users of one namespace in a virtual host of the test's own."""

    namespace: str
    prefix: str
    passwords: dict[str, str]
    urls: dict[str, str]

    def user(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def settings(self, role: str, **overrides: object) -> Settings:
        return make_settings(**{"amqp_url": self.urls[role], "namespace": self.namespace, **overrides})


def amqp_url_of(user: str, password: str, vhost: str) -> str:
    parts = urlsplit(AMQP_URL)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}", path=f"/{vhost}").geturl()


@pytest.fixture(scope="module")
def roles() -> Iterator[BrokerRoles]:
    tag = uuid.uuid4().hex[:8]
    vhost, namespace, prefix = f"sfx-roles-{tag}", f"test-{tag}", f"t{tag}-"
    passwords = {role: f"{role}-{uuid.uuid4().hex}" for role in ROLES}
    environment = {
        **os.environ,
        "SFX_SERVICE_PASSWORD": passwords["service"],
        "SFX_OPERATOR_PASSWORD": passwords["operator"],
        "SFX_SUBSCRIBER_PASSWORD": passwords["subscriber"],
    }
    rabbitmqctl("add_vhost", vhost)
    try:
        script = subprocess.run(
            ["bash", str(REPO / "scripts" / "broker-roles.sh"), vhost, namespace, prefix],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert script.returncode == 0, script.stderr
        for password in passwords.values():
            assert password not in script.stdout + script.stderr  # the script never shows a password
        urls = {role: amqp_url_of(f"{prefix}{role}", passwords[role], vhost) for role in ROLES}
        found = BrokerRoles(namespace=namespace, prefix=prefix, passwords=passwords, urls=urls)
        service = found.settings("service")
        with connect(service, role="test-setup") as connection:  # the whole topology, as the service user
            Topology(service).declare(connection)
        yield found
    finally:
        for role in ROLES:
            if f"{prefix}{role}" in rabbitmqctl("list_users", "--quiet", "--no-table-headers"):
                rabbitmqctl("delete_user", f"{prefix}{role}")
        rabbitmqctl("delete_vhost", vhost)
        LiveState(make_settings(namespace=namespace)).delete_namespace()


def assert_refused(publish: Callable[[], None]) -> None:
    """The broker closes the channel with ACCESS_REFUSED (403), which the publisher reports at once."""
    with pytest.raises(PublishError) as caught:
        publish()
    assert isinstance(caught.value.__cause__, amqp.exceptions.AccessRefused), repr(caught.value.__cause__)
    assert "ACCESS_REFUSED" in str(caught.value)


def publish_as(roles: BrokerRoles, role: str, message: Message, *, stamp_user_id: bool = False) -> None:
    with Publisher(roles.settings(role), role=f"test {role}", retry_seconds=3, stamp_user_id=stamp_user_id) as pub:
        pub.publish(message)


def reprocess_request(trial: str = "again") -> ReprocessRequest:
    return ReprocessRequest(run_ids=["r1"], trial=trial, requested_by="someone-else")


# -- broker ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [CancelRequest(job_id="r1.live"), reprocess_request(), make_frame_result(0, run_id="r1")],
    ids=["cancel", "reprocess", "frame-result"],
)
def test_a_subscriber_may_not_publish_requests_or_results(roles: BrokerRoles, message: Message) -> None:
    assert_refused(lambda: publish_as(roles, "subscriber", message))


def test_a_subscriber_reads_its_own_queue_and_nothing_else(roles: BrokerRoles) -> None:
    ns = roles.namespace
    results = kombu.Exchange(f"{ns}.results", type="topic", no_declare=True)  # exists; declaring would need configure
    mine = kombu.Queue(f"{ns}.sub.mine", exchange=results, routing_key="frame.#", exclusive=True, auto_delete=True)
    with connect(roles.settings("subscriber"), role="test subscriber") as connection:
        queue = mine.bind(connection.channel())
        queue.declare()  # declare and bind to the results exchange
        publish_as(roles, "service", make_frame_result(7, run_id="r9"))
        received = wait_for(lambda: queue.get(no_ack=True), 10, "the frame result in the subscriber's queue")
        assert decode_message(body_bytes(received)) == make_frame_result(7, run_id="r9")
        # Queues not named <ns>.sub.<name> it may neither create nor read (the dispatcher's requests, say).
        for attempt in (
            lambda channel: kombu.Queue(f"{ns}.mine", exclusive=True).bind(channel).declare(),
            lambda channel: channel.basic_get(f"{ns}.dispatcher.control"),
        ):
            with pytest.raises(amqp.exceptions.AccessRefused):
                attempt(connection.channel())


def test_the_documented_subscriber_runs_as_the_subscriber_user(roles: BrokerRoles, tmp_path: Path) -> None:
    text = (REPO / "docs" / "subscribing.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    program = tmp_path / "subscriber.py"
    program.write_text(code.group(1))
    url = roles.urls["subscriber"]  # the virtual host's name needs no escaping, so pika reads kombu's URL as it is
    command = [sys.executable, str(program), "--url", url, "--namespace", roles.namespace, "--run", "r5"]
    subscriber = subprocess.Popen(
        [*command, "--count", "1", "--seconds", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert subscriber.stdout is not None
    assert subscriber.stdout.readline().strip() == "subscribed", subscriber.stderr
    publish_as(roles, "service", make_frame_result(3, run_id="r5"))
    output, errors = subscriber.communicate(timeout=30)
    assert subscriber.returncode == 0, errors
    assert '"frame": 3' in output


def take_control_request(roles: BrokerRoles) -> kombu.Message:
    """The next message of the dispatcher's control queue, taken as the service user."""
    service = roles.settings("service")
    with connect(service, role="test service") as connection:
        queue = Topology(service).queue("dispatcher.control").bind(connection.channel())
        message: kombu.Message = wait_for(lambda: queue.get(no_ack=True), 10, "a request in the control queue")
        return message


def test_an_operator_may_send_requests_but_not_results(roles: BrokerRoles) -> None:
    publish_as(roles, "operator", CancelRequest(job_id="r1.unknown"), stamp_user_id=True)
    request = decode_message(body_bytes(take_control_request(roles)))
    assert isinstance(request, CancelRequest) and request.job_id == "r1.unknown"
    assert_refused(lambda: publish_as(roles, "operator", make_frame_result(0, run_id="r1")))


def test_the_broker_vouches_for_the_user_id_of_an_operators_request(roles: BrokerRoles) -> None:
    operator = roles.user("operator")
    publish_as(roles, "operator", reprocess_request("vouched"), stamp_user_id=True)
    received = take_control_request(roles)
    assert received.properties["user_id"] == operator
    request = decode_message(body_bytes(received))
    assert isinstance(request, ReprocessRequest) and request.trial == "vouched"
    # Claiming to be someone else: the broker closes the channel (PRECONDITION_FAILED) and nothing is delivered.
    forged = Outgoing(
        body=reprocess_request("forged").encode(),
        exchange=f"{roles.namespace}.control",
        routing_key="reprocess.forged",
        headers=message_headers(reprocess_request("forged")),
        user_id=roles.user("service"),
    )
    with Publisher(roles.settings("operator"), retry_seconds=3) as publisher, pytest.raises(PublishError) as caught:
        publisher.publish_outgoing([forged])
    assert "PRECONDITION_FAILED" in str(caught.value)


class IdleBackend:
    """A backend that accepts jobs and runs nothing: the dispatcher's bookkeeping without processes."""

    name = "idle"

    def __init__(self) -> None:
        self.jobs: dict[str, RunState] = {}

    def start(self, spec: JobSpec) -> str:
        self.jobs[spec.job_id] = RunState.RUNNING
        return f"idle-{spec.job_id}"

    def poll(self) -> dict[str, BackendJobStatus]:
        return {job: BackendJobStatus(job_id=job, backend_id=f"idle-{job}", state=s) for job, s in self.jobs.items()}

    def cancel(self, job_id: str) -> None:
        self.jobs[job_id] = RunState.CANCELLED

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)


def test_the_dispatcher_records_the_broker_checked_sender_in_the_reason(roles: BrokerRoles, tmp_path: Path) -> None:
    service = roles.settings("service", work_dir=tmp_path)
    state = LiveState(service)
    state.save_run(RunManifest(run_id="r1", files=["/data/r1.h5"], file_format="nxmx", frame_count=10))
    states: list[JobState] = []
    watch = kombu.Queue(
        f"{roles.namespace}.test-states",
        exchange=kombu.Exchange(f"{roles.namespace}.results", type="topic", no_declare=True),
        routing_key="job.#",
        exclusive=True,
    )

    def state_of(job_id: str, status: JobStatus) -> JobState | None:
        """The first published state of ``job_id`` with ``status``, reading what arrived since the last call."""
        while (message := queue.get(no_ack=True)) is not None:
            decoded = decode_message(body_bytes(message))
            assert isinstance(decoded, JobState)
            states.append(decoded)
        return next((s for s in states if s.job_id == job_id and s.status is status), None)

    dispatcher = Dispatcher(service, IdleBackend())
    operator = roles.user("operator")
    try:
        with connect(service, role="test watch") as connection:
            queue = watch.bind(connection.channel())
            queue.declare()
            with running(make_consumers(dispatcher, service)[1]):
                publish_as(roles, "operator", reprocess_request("by-operator"), stamp_user_id=True)
                queued = wait_for(lambda: state_of("r1.by-operator", JobStatus.QUEUED), 20, "the queued job")
                assert queued is not None
                assert queued.reason == f"queued: reprocess requested by {operator}"
                publish_as(roles, "operator", CancelRequest(job_id="r1.by-operator"), stamp_user_id=True)
                cancelled = wait_for(lambda: state_of("r1.by-operator", JobStatus.CANCELLED), 20, "the cancelled job")
                assert cancelled is not None
                assert cancelled.reason.endswith(f"requested by {operator}")
                assert "cancelled by" in cancelled.reason
                # Without user_id (an older client), the body's requested_by is not believed.
                publish_as(roles, "service", reprocess_request("unstamped"))
                unverified = wait_for(lambda: state_of("r1.unstamped", JobStatus.QUEUED), 20, "the unstamped job")
                assert unverified is not None
                assert unverified.reason == "queued: reprocess requested by an unverified user"
                assert "someone-else" not in unverified.reason
    finally:
        dispatcher.stop()


def test_wrong_broker_credentials_are_named_without_the_password(roles: BrokerRoles) -> None:
    wrong = roles.settings("operator", amqp_url=roles.urls["operator"].replace(roles.passwords["operator"], "nope-x"))
    with pytest.raises(CredentialsError) as caught:
        check_credentials(wrong)
    text = str(caught.value)
    assert f"RabbitMQ refused the login of user {roles.user('operator')} at amqp://" in text
    assert ":***@" in text and "nope-x" not in text


# -- Redis -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisRoles:
    namespace: str
    prefix: str
    passwords: dict[str, str]

    def url(self, role: str, password: str | None = None) -> str:
        parts = urlsplit(REDIS_URL)
        host = parts.netloc.rpartition("@")[2]
        secret = self.passwords[role] if password is None else password
        return parts._replace(netloc=f"{self.prefix}{role}:{secret}@{host}").geturl()

    def settings(self, role: str, password: str | None = None) -> Settings:
        return make_settings(namespace=self.namespace, redis_url=self.url(role, password))


@pytest.fixture(scope="module")
def redis_roles() -> Iterator[RedisRoles]:
    tag = uuid.uuid4().hex[:8]
    found = RedisRoles(
        namespace=f"test-{tag}",
        prefix=f"t{tag}-",
        passwords={"service": f"svc-{uuid.uuid4().hex}", "monitor": f"mon-{uuid.uuid4().hex}"},
    )
    environment = {
        **os.environ,
        "SFX_REDIS_SERVICE_PASSWORD": found.passwords["service"],
        "SFX_REDIS_MONITOR_PASSWORD": found.passwords["monitor"],
        "SFX_REDIS_ADMIN_URL": REDIS_URL,
    }
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        script = subprocess.run(
            ["bash", str(REPO / "scripts" / "redis-roles.sh"), found.namespace, found.prefix],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert script.returncode == 0, script.stderr
        for password in found.passwords.values():
            assert password not in script.stdout + script.stderr
        yield found
    finally:
        admin.acl_deluser(f"{found.prefix}service", f"{found.prefix}monitor")
        LiveState(make_settings(namespace=found.namespace)).delete_namespace()
        admin.close()


def manifest(run_id: str) -> RunManifest:
    return RunManifest(run_id=run_id, files=[f"/data/{run_id}.h5"], file_format="nxmx", frame_count=5)


def test_the_service_user_works_in_its_namespace_only(redis_roles: RedisRoles) -> None:
    state = LiveState(redis_roles.settings("service"))
    state.save_run(manifest("r1"))
    saved = state.run("r1")
    assert saved is not None and saved.files == manifest("r1").files
    with pytest.raises(redis.exceptions.NoPermissionError):
        state.redis.set("not-sfx:key", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        state.redis.flushall()


def test_a_wrong_redis_password_is_refused_and_named_without_it(redis_roles: RedisRoles) -> None:
    wrong = redis_roles.settings("service", password="wrong-secret-123")
    with pytest.raises(redis.AuthenticationError) as refused:
        LiveState(wrong).run("r1")
    assert "wrong-secret-123" not in str(refused.value)
    with pytest.raises(CredentialsError) as caught:
        check_credentials(wrong)
    user = f"{redis_roles.prefix}service"
    assert f"Redis refused the credentials of user {user} at redis://{user}:***@" in str(caught.value)
    assert "wrong-secret-123" not in str(caught.value)


def test_the_monitor_user_reads_but_cannot_write(redis_roles: RedisRoles) -> None:
    LiveState(redis_roles.settings("service")).save_run(manifest("r2"))
    monitor = LiveState(redis_roles.settings("monitor"))
    assert monitor.run("r2") is not None
    with pytest.raises(redis.exceptions.NoPermissionError):
        monitor.save_run(manifest("r3"))


@pytest.mark.parametrize("server", ["redis", "broker"])
def test_a_service_started_with_wrong_credentials_stops_and_logs_no_password(
    roles: BrokerRoles, redis_roles: RedisRoles, server: str, tmp_path: Path
) -> None:
    secret = "never-print-this-7"
    settings = make_settings(
        namespace=roles.namespace,
        amqp_url=roles.urls["service"]
        if server == "redis"
        else roles.urls["service"].replace(roles.passwords["service"], secret),
        redis_url=redis_roles.url("service", secret) if server == "redis" else redis_roles.url("service"),
        work_dir=tmp_path,
    )
    started = subprocess.run(
        [sys.executable, "-m", "services.merger"],
        env=settings_environment(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    assert secret not in started.stdout + started.stderr
    if server == "redis":
        assert f"Redis refused the credentials of user {redis_roles.prefix}service" in started.stderr
    else:
        assert f"RabbitMQ refused the login of user {roles.user('service')}" in started.stderr
