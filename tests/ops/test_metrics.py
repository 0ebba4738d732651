"""Metrics scraped over HTTP from a real daemon reflect what the test just did."""

from __future__ import annotations

import asyncio
import gc
import re
import secrets
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from msgd.gateway import GatewayUe
from msgd.ops.metrics import Metrics
from msgd.procedures import Procedure
from tests.harness import ChildServer, Gw, connect, make_deployment
from wire.constants import FailureCause

UES = {f"ue-{i}@gw1.example": ["gw1.example"] for i in range(8)}
UES["other@gw2.example"] = ["gw2.example"]


def _scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_scraped_metrics_reflect_registrations(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues=UES,
                          gateways=(Gw("gw1.example"), Gw("gw2.example")),
                          extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    try:
        listening = re.compile(r"event=metrics\.listening address=127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + 15
        while not (match := listening.search(child.log_text())):
            assert time.monotonic() < deadline, child.log_text()
            await asyncio.sleep(0.02)  # the daemon logs it just after the gateway listener
        address = ("127.0.0.1", int(match.group(1)))
        before = await asyncio.to_thread(_scrape, address)
        assert _value(before, "msgd_registered_ues") == 0
        assert _value(before, "msgd_connected_gateways") == 0

        async with await connect(dep, child.address) as gw:
            for i in range(3):
                assert (await gw.register(dep.ue(f"ue-{i}@gw1.example"))).ok
            wrong = await gw.register(GatewayUe("ue-3@gw1.example", secrets.token_bytes(32)))
            assert wrong.cause is FailureCause.AUTHENTICATION_FAILED
            unknown = await gw.register(GatewayUe("nobody@x", secrets.token_bytes(32)))
            assert unknown.cause is FailureCause.UE_NOT_PROVISIONED
            results = [r async for r in gw.bulk_register(
                dep.ue(f"ue-{i}@gw1.example") for i in range(3, 8))]
            assert all(r.ok for r in results) and len(results) == 5
            assert (await gw.deregister(dep.ue("ue-0@gw1.example"))).ok

            during = await asyncio.to_thread(_scrape, address)
            assert _value(during, "msgd_connected_gateways") == 1
            assert _value(during, "msgd_registered_ues") == 7
            assert _value(during, "msgd_provisioned_ues") == 9
            assert _value(during, "msgd_registry_pending_changes") == 0
            procedures = "msgd_procedures_total"
            assert _value(during, procedures, procedure="registration", result="success",
                          cause="") == 3
            assert _value(during, procedures, procedure="registration", result="failure",
                          cause="AUTHENTICATION_FAILED") == 1
            assert _value(during, procedures, procedure="registration", result="failure",
                          cause="UE_NOT_PROVISIONED") == 1
            assert _value(during, procedures, procedure="bulk_registration", result="success",
                          cause="") == 5
            assert _value(during, procedures, procedure="deregistration", result="success",
                          cause="") == 1
            assert _value(during, "msgd_bulk_entries_total", procedure="bulk_registration") == 5
            assert _value(during, "msgd_bulk_transactions_total",
                          procedure="bulk_registration") == 1
            assert _value(during, "msgd_messages_received_total",
                          type="UE_REGISTRATION_REQUEST") == 5
            assert _value(during, "msgd_messages_received_total", type="HELLO") == 1
            # HELLO, 5 single requests, 1 de-registration, 1 bulk request frame.
            assert _value(during, "msgd_frames_received_total") == 8
            assert _value(during, "msgd_received_bytes_total") > 0
            assert _value(during, "msgd_sent_bytes_total") > 0
            # Every change (3 + 5 registrations, 1 de-registration) went through a group
            # commit whose latency was observed.
            assert _value(during, "msgd_group_commit_changes_sum") == 9
            commits = _value(during, "msgd_group_commit_seconds_count")
            assert 1 <= commits <= 9
            assert 0 < _value(during, "msgd_group_commit_seconds_sum") < 10 * commits
            days = _value(during, "msgd_certificate_expiry_days", certificate="server",
                          subject="CN=localhost")
            assert 824 < days <= 825  # tests/pki.py: server certificates last 825 days
            gateway_days = _value(during, "msgd_gateway_certificate_expiry_days",
                                  gateway="gw1.example")
            assert 824 < gateway_days <= 825
            assert ("msgd_event_loop_lag_seconds", ()) in during
            assert _value(during, "process_open_fds") > 0

        # After the gateway left: its gauge and certificate line are gone.
        deadline = time.monotonic() + 10
        while True:
            after = await asyncio.to_thread(_scrape, address)
            if _value(after, "msgd_connected_gateways") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # the close is processed by the daemon; bounded poll
        assert _value(after, "msgd_connected_gateways") == 0
        assert ("msgd_gateway_certificate_expiry_days", (("gateway", "gw1.example"),)) \
            not in after
        assert _value(after, "msgd_registered_ues") == 7
    finally:
        assert child.terminate() == 0


def test_group_commit_latency_is_timed_from_the_oldest_change_of_a_batch() -> None:
    # The bookkeeping behind msgd_group_commit_seconds, fed as transport and registry do.
    metrics = Metrics()
    metrics.submitted(3, when=10.0)   # changes 1..3 arrived at t=10
    metrics.submitted(5, when=10.5)   # changes 4..5 at t=10.5
    metrics.settled(1, 2, True, now=11.0)  # batch 1..2: oldest submitted at 10.0
    metrics.settled(3, 5, True, now=12.0)  # batch 3..5: oldest (3) submitted at 10.0
    metrics.submitted(6, when=20.0)
    metrics.settled(6, 6, False, now=20.25)  # a failed batch is timed too
    registry = metrics.registry
    assert registry.get_sample_value("msgd_group_commit_seconds_count") == 3
    assert registry.get_sample_value("msgd_group_commit_seconds_sum") == 1.0 + 2.0 + 0.25
    assert registry.get_sample_value("msgd_group_commit_changes_sum") == 6
    assert registry.get_sample_value("msgd_registry_commit_failures_total") == 1


def test_loop_counters_expose_what_the_hooks_counted() -> None:
    """The per-request counters are plain ints read at scrape time; the exposition keeps the
    names, labels and values a prometheus_client Counter gave (systemd/README.md lists them)."""
    metrics = Metrics()
    registry = metrics.registry
    assert registry.get_sample_value("msgd_received_bytes_total") == 0
    metrics.received(100)
    metrics.received(23)
    metrics.sent(7)
    metrics.frames(3)
    metrics.message("HELLO")
    metrics.message("UE_REGISTRATION_REQUEST")
    metrics.message("UE_REGISTRATION_REQUEST")
    metrics.answers({(Procedure.REGISTRATION, None): 2,
                     (Procedure.BULK_DEREGISTRATION, FailureCause.NOT_REGISTERED): 5})
    assert registry.get_sample_value("msgd_received_bytes_total") == 123
    assert registry.get_sample_value("msgd_sent_bytes_total") == 7
    assert registry.get_sample_value("msgd_frames_received_total") == 3
    assert registry.get_sample_value("msgd_messages_received_total", {"type": "HELLO"}) == 1
    assert registry.get_sample_value("msgd_messages_received_total",
                                     {"type": "UE_REGISTRATION_REQUEST"}) == 2
    assert registry.get_sample_value("msgd_procedures_total", {
        "procedure": "registration", "result": "success", "cause": ""}) == 2
    assert registry.get_sample_value("msgd_procedures_total", {
        "procedure": "bulk_deregistration", "result": "failure",
        "cause": "NOT_REGISTERED"}) == 5
    assert registry.get_sample_value("msgd_procedures_total", {
        "procedure": "deregistration", "result": "success", "cause": ""}) == 0
    assert registry.get_sample_value("msgd_bulk_entries_total",
                                     {"procedure": "bulk_deregistration"}) == 5
    text = generate_latest(registry).decode()
    assert "# TYPE msgd_procedures_total counter" in text
    assert 'msgd_messages_received_total{type="HELLO"} 1.0' in text
    with pytest.raises(ValueError):
        metrics.sent(-1)


def test_a_scrape_while_the_loop_adds_counters_sees_each_at_a_value_it_had() -> None:
    metrics = Metrics()
    stop = threading.Event()
    seen: list[float] = []
    failures: list[BaseException] = []

    def scrape() -> None:
        try:
            while not stop.is_set():
                generate_latest(metrics.registry)
                seen.append(metrics.registry.get_sample_value("msgd_sent_bytes_total"))
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            failures.append(exc)

    def during_collection(phase: str, info: dict[str, int]) -> None:
        # Python code run by a collection (as finalizers are) lets the other thread in, even
        # in the middle of a C call that allocates: this is how a copy of a dict gets torn.
        del phase, info

    scraper = threading.Thread(target=scrape)
    interval = sys.getswitchinterval()
    threshold = gc.get_threshold()
    sys.setswitchinterval(1e-6)  # threads switch often: the scrape meets new children
    gc.set_threshold(50)
    gc.callbacks.append(during_collection)
    scraper.start()
    try:
        for index in range(20_000):
            metrics.sent(1)
            metrics.message(f"TYPE_{index % 5000}")  # new children while scrapes run
    finally:
        stop.set()
        scraper.join()
        gc.callbacks.remove(during_collection)
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
    assert not failures
    assert seen == sorted(seen) and all(0 <= value <= 20_000 for value in seen)
    assert metrics.registry.get_sample_value("msgd_sent_bytes_total") == 20_000
