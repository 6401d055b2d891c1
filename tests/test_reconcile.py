"""The pure side of creates in doubt: which ends of a create are in doubt, which listed predictions may be one, whether
a prediction's input is the request sent, and the Reconciler's sweeps, by table."""

from __future__ import annotations

from typing import Any

import pytest

from batchrunner.api.client import Execution, ExecutionsPage
from batchrunner.engine.reconcile import (
    LOOKS,
    MAX_PAGES,
    TRIES,
    Doubt,
    Outcome,
    Reconciler,
    candidates,
    create_in_doubt,
    inputs_match,
    listing_span,
    look_at,
)
from batchrunner.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    NetworkError,
    PaymentRequired,
    RateLimited,
    RequestRejected,
    ServerError,
)


@pytest.mark.parametrize(
    ("exc", "in_doubt"),
    [
        # Nothing was created: a 4xx answer, or a connection that never carried the request.
        (RateLimited("busy", status=429), False),
        (PaymentRequired("no credit", status=402), False),
        (RequestRejected("bad input", status=400), False),
        (RequestRejected("unprocessable", status=422), False),
        (AuthError("bad key", status=401), False),
        (NetworkError("connection refused", sent=False), False),
        # Anything else may have made a prediction.
        (ServerError("gateway timeout", status=504), True),
        (ServerError("bad gateway page", status=502), True),
        (ServerError("internal", status=500), True),
        (ServerError("answer cut short"), True),
        (ServerError("create answer has no prediction id", status=200), True),
        (ServerError("empty answer", status=201), True),
        (ApiTimeout("no answer in time"), True),
        (NetworkError("reset by peer", sent=True), True),
        (RequestRejected("redirect", status=302), True),
        (ApiError("odd"), True),
    ],
)
def test_create_in_doubt_unless_a_4xx_or_never_sent(exc: ApiError, in_doubt: bool) -> None:
    assert create_in_doubt(exc) is in_doubt


@pytest.mark.parametrize(
    ("sent", "held", "match"),
    [
        ({"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 1}, True),
        ({"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 1, "safety_tolerance": 6}, True),  # defaults added
        ({"prompt": "a", "safety_tolerance": 6}, {"prompt": "a", "safety_tolerance": "6"}, True),  # number as text
        ({"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 1.0}, True),
        ({"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 2}, False),
        ({"prompt": "a", "seed": 1}, {"prompt": "a"}, False),  # a field sent is missing
        ({"prompt": "a"}, {"prompt": "b"}, False),
        ({"prompt": "a"}, {"prompt": "a "}, True),  # text compared trimmed
        ({"flag": True}, {"flag": "True"}, False),  # booleans are themselves only
        ({"flag": True}, {"flag": 1}, False),
        ({"tags": [1, 2]}, {"tags": [1, 2]}, True),
        ({"tags": [1, 2]}, {"tags": [2, 1]}, False),
        ({"opts": {"a": 1}}, {"opts": {"a": "1", "b": 2}}, True),
        ({"opts": {"a": 1}}, {"opts": "a=1"}, False),
        ({"prompt": "a"}, None, False),
        ({}, {"prompt": "a"}, True),
        ({"input_image": "https://x/f.png"}, {"input_image": "https://x/g.png"}, False),
    ],
)
def test_inputs_match_compares_every_field_sent(sent: dict[str, Any], held: dict[str, Any] | None, match: bool) -> None:
    assert inputs_match(sent, held) is match


def row(id: str, at: float | None, model: str | None = "m") -> Execution:
    return Execution(id=id, model=model, status="success", created_at=at)


@pytest.mark.parametrize(
    ("rows", "known", "expected"),
    [
        ([row("a", 105.0), row("b", 110.0)], set(), ["a", "b"]),
        ([row("a", 105.0), row("b", 110.0)], {"a"}, ["b"]),  # the ledger knows it already
        ([row("a", 99.0), row("b", 121.0), row("c", 100.0), row("d", 120.0)], set(), ["c", "d"]),  # span inclusive
        ([row("a", 105.0, model="other")], set(), []),
        ([row("a", 105.0, model=None)], set(), ["a"]),  # no model in the row: a GET settles it
        ([row("a", None)], set(), ["a"]),  # unreadable time: kept
        ([row("a", 105.0), row("a", 105.0)], set(), ["a"]),
    ],
)
def test_candidates_are_unknown_predictions_of_the_model_in_the_span(
    rows: list[Execution], known: set[str], expected: list[str]
) -> None:
    assert candidates(rows, model="m", start=100.0, end=120.0, known=known) == expected


def doubt(fp: str, *, sent: float = 1000.0, answered: float = 1001.0, base: float = 0.0, **request: Any) -> Doubt:
    return Doubt(fp, f"job-{fp}", request or {"prompt": fp}, sent, answered, base)


def test_listing_span_covers_every_send_to_answer_widened_by_the_skew() -> None:
    doubts = [doubt("a", sent=1000.0, answered=1030.0), doubt("b", sent=990.0, answered=995.0)]
    assert listing_span(doubts, 10.0) == (980.0, 1040.0)
    with pytest.raises(ValueError):
        listing_span([], 10.0)


@pytest.mark.parametrize(("looks", "at"), [(0, 101.0), (1, 103.0), (2, 107.0)])
def test_looks_wait_longer_each_time(looks: int, at: float) -> None:
    assert look_at(100.0, looks, 2.0) == at


def page(*rows: Execution, full: bool = False) -> ExecutionsPage:
    return ExecutionsPage(rows=rows, full=full)


def reconciler(*doubts: Doubt, known: set[str] | None = None) -> Reconciler:
    recon = Reconciler(model="m", known=known if known is not None else set(), wait=2.0, skew=5.0)
    for d in doubts:
        recon.add(d)
    return recon


def step(recon: Reconciler) -> tuple[str, Any]:
    request = recon.next_request()
    assert request is not None
    recon.begin(request)
    return request


def test_a_listed_prediction_with_the_request_is_adopted() -> None:
    recon = reconciler(doubt("a", prompt="cat"), doubt("b", prompt="dog"))
    assert recon.next_due() == 1.0
    recon.start(1.0)
    assert step(recon) == ("list", 0)
    assert recon.on_page(page(row("p1", 1000.5), row("p2", 1000.7), row("old", 900.0))) is None
    assert step(recon) == ("inspect", "p1")
    outcome = recon.on_prediction("p1", {"prompt": "dog", "seed": 4})
    assert outcome is not None
    assert [(d.fingerprint, pid) for d, pid in outcome.adopted] == [("b", "p1")]
    assert "p1" in recon.known
    assert step(recon) == ("inspect", "p2")
    outcome = recon.on_prediction("p2", {"prompt": "cat"})
    assert outcome is not None
    assert [(d.fingerprint, pid) for d, pid in outcome.adopted] == [("a", "p2")]
    assert outcome.not_created == ()
    assert len(recon) == 0 and recon.sweep is None


def test_no_match_after_every_look_means_nothing_was_created() -> None:
    recon = reconciler(doubt("a"))
    seen_due = []
    for look in range(LOOKS):
        due = recon.next_due()
        assert due is not None
        seen_due.append(due)
        recon.start(due)
        assert step(recon) == ("list", 0)
        outcome = recon.on_page(page(row("other", 1000.5)) if look == 0 else page())
        if look == 0:
            assert outcome is None
            assert step(recon) == ("inspect", "other")
            outcome = recon.on_prediction("other", {"prompt": "someone else's"})
        assert outcome is not None
        if look < LOOKS - 1:
            assert outcome.not_created == () and len(recon) == 1
        else:
            assert [d.fingerprint for d in outcome.not_created] == ["a"]
    assert seen_due == [1.0, 3.0, 7.0]
    assert len(recon) == 0


def test_a_candidate_already_inspected_is_not_got_again_on_the_next_look() -> None:
    recon = reconciler(doubt("a"))
    recon.start(1.0)
    step(recon)
    recon.on_page(page(row("x", 1000.5)))
    step(recon)
    recon.on_prediction("x", {"prompt": "not a"})
    recon.start(3.0)
    step(recon)
    outcome = recon.on_page(page(row("x", 1000.5), row("y", 1000.9)))
    assert outcome is None
    assert step(recon) == ("inspect", "y")


def test_full_pages_are_followed_until_a_short_one() -> None:
    recon = reconciler(doubt("a"))
    recon.start(1.0)
    assert step(recon) == ("list", 0)
    recon.on_page(page(*(row(f"k{i}", 1000.5) for i in range(3)), full=True))
    # The page's candidates come first, then the next page.
    for i in range(3):
        assert step(recon) == ("inspect", f"k{i}")
        recon.on_prediction(f"k{i}", {"prompt": "no"})
    assert step(recon) == ("list", 3)
    outcome = recon.on_page(page())
    assert outcome is not None and outcome.not_created == ()  # a look, not the last


def test_paging_stops_at_rows_older_than_the_span() -> None:
    recon = reconciler(doubt("a"))
    recon.start(1.0)
    step(recon)
    outcome = recon.on_page(page(row("old1", 500.0), row("old2", 400.0), full=True))
    assert outcome is not None  # the look is over: no candidates, no next page
    assert recon.sweep is None


def test_a_span_too_busy_to_search_falls_back() -> None:
    recon = reconciler(doubt("a"))
    recon.start(1.0)
    outcome = None
    for n in range(MAX_PAGES):
        assert step(recon) == ("list", n)
        outcome = recon.on_page(page(row(f"r{n}", 1000.5, model="other"), full=True))
    assert outcome is not None
    assert [d.fingerprint for d in outcome.unresolved] == ["a"]


def test_a_listing_failing_for_good_hands_its_doubts_back_unresolved_after_three_tries() -> None:
    recon = reconciler(doubt("a", base=0.0), doubt("b", base=50.0))
    for attempt in range(TRIES):
        recon.start(1.0)  # only "a" is due
        assert step(recon) == ("list", 0)
        outcome = recon.on_failure()
        if attempt < TRIES - 1:
            assert outcome.unresolved == ()
            assert recon.doubts["a"].looks == 0  # a failed look is no look
    assert [d.fingerprint for d in outcome.unresolved] == ["a"]
    assert list(recon.doubts) == ["b"]


def test_a_failed_get_of_a_candidate_makes_the_look_a_failure_not_a_look_that_found_nothing() -> None:
    recon = reconciler(doubt("a"))
    got: Outcome | None = None
    for attempt in range(TRIES):
        recon.start(1.0 + 10 * attempt)
        step(recon)
        recon.on_page(page(row("p", 1000.5)))
        assert step(recon) == ("inspect", "p")
        got = recon.on_inspect_failed("p")
        assert got is not None
        assert got.not_created == ()
    assert got is not None
    assert [d.fingerprint for d in got.unresolved] == ["a"]


def test_a_prediction_got_before_its_doubt_arose_is_matched_when_it_does() -> None:
    # Create B was made on the server and listed while its slow answer was still on the way: a sweep for doubt A got
    # it and found it matched nothing. When B's answer fails and B is in doubt, that prediction is B's: skipping it as
    # "inspected already" would create B again and pay twice.
    recon = reconciler(doubt("a", prompt="cat"))
    recon.start(1.0)
    step(recon)
    recon.on_page(page(row("pb", 1000.6)))
    assert step(recon) == ("inspect", "pb")
    assert recon.on_prediction("pb", {"prompt": "dog"}) is not None  # A's look is over, nothing found yet
    recon.add(doubt("b", prompt="dog", base=1.2))
    recon.start(3.0)
    step(recon)
    outcome = recon.on_page(page(row("pb", 1000.6)))
    assert outcome is not None
    assert [(d.fingerprint, pid) for d, pid in outcome.adopted] == [("b", "pb")]
    assert recon.next_request() is None  # no second GET of "pb", and the sweep is over


def test_a_refused_page_is_asked_for_again() -> None:
    recon = reconciler(doubt("a"))
    recon.start(1.0)
    assert step(recon) == ("list", 0)
    assert recon.next_request() is None  # one page at a time
    recon.retry_listing()
    assert recon.next_request() == ("list", 0)


def test_a_prediction_found_for_a_doubt_not_yet_due_settles_it_too() -> None:
    recon = reconciler(doubt("a", prompt="cat", base=0.0), doubt("b", prompt="dog", base=50.0))
    recon.start(1.0)
    step(recon)
    recon.on_page(page(row("p", 1000.5)))
    step(recon)
    outcome = recon.on_prediction("p", {"prompt": "dog"})
    assert outcome is not None
    assert [d.fingerprint for d, _ in outcome.adopted] == ["b"]
    assert [d.fingerprint for d in outcome.not_created] == []
    assert recon.doubts["a"].looks == 1


def test_a_known_prediction_is_never_adopted() -> None:
    recon = reconciler(doubt("a", prompt="cat"), known={"p"})
    recon.start(1.0)
    step(recon)
    recon.on_page(page(row("p", 1000.5)))
    assert recon.next_request() is None  # "p" is no candidate
    assert recon.sweep is None


def test_a_failed_get_leaves_the_candidate_for_the_next_sweep() -> None:
    recon = reconciler(doubt("a", prompt="cat"))
    recon.start(1.0)
    step(recon)
    recon.on_page(page(row("p", 1000.5)))
    step(recon)
    recon.on_inspect_failed("p")
    assert "p" not in recon.inspected
    recon.start(3.0)
    step(recon)
    recon.on_page(page(row("p", 1000.5)))
    assert step(recon) == ("inspect", "p")


def test_start_needs_a_due_doubt_and_no_sweep_running() -> None:
    recon = reconciler(doubt("a", base=10.0))
    with pytest.raises(RuntimeError):
        recon.start(0.0)
    recon.start(11.0)
    assert recon.next_due() is None
    with pytest.raises(RuntimeError):
        recon.start(11.0)
