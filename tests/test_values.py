"""Values read one way only: integers as plain decimals, durations that must be positive, finite numbers, and input
URLs the API can fetch. Each kind by table; each refusal is one line naming file, line, job and field."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from batchrunner.cli import main as cli
from batchrunner.cli import options
from batchrunner.errors import ManifestError, UsageError
from batchrunner.limits.window import parse_duration
from batchrunner.manifest import parse_manifest
from batchrunner.manifest.images import check_url_hosts, unfetchable_host


def parse(text: str) -> dict[str, object]:
    manifest = parse_manifest(text, path=Path("m.yaml"), hash_file=lambda p: "0" * 64)
    return dict(manifest.jobs[0].input)


def refusal(text: str) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, path=Path("m.yaml"), hash_file=lambda p: "0" * 64)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- integers written as plain decimals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("010", "write integers as plain decimals: '010' (did you mean 10?)"),
        ("00", "write integers as plain decimals: '00' (did you mean 0?)"),
        ("0007", "write integers as plain decimals: '0007' (did you mean 7?)"),
        ("1:30", "write integers as plain decimals: '1:30' (YAML 1.1 reads it as the base-60 number 90)"),
        ("1:02:03", "write integers as plain decimals: '1:02:03' (YAML 1.1 reads it as the base-60 number 3723)"),
        ("0x10", "write integers as plain decimals: '0x10' (did you mean 16?)"),
        ("0b101", "write integers as plain decimals: '0b101' (did you mean 5?)"),
        ("1_000", "write integers as plain decimals: '1_000' (did you mean 1000?)"),
        ("+5", "write integers as plain decimals: '+5' (did you mean 5?)"),
        ("!!int '010'", "write integers as plain decimals: '010' (did you mean 10?)"),
        ("0o17", "must be an integer, got '0o17' (did you mean 15?)"),  # YAML 1.1 reads it as text
        ("08", "must be an integer, got '08' (did you mean 8?)"),
        ("1e3", "must be an integer, got '1e3' (did you mean 1000?)"),
        ("1.0e+3", "must be an integer, got 1000.0 (did you mean 1000?)"),
        ("7.0", "must be an integer, got 7.0 (did you mean 7?)"),
        (".5", "must be an integer, got 0.5"),
        ("'7'", "must be an integer, got '7' (did you mean 7?)"),
        ("true", "must be an integer, got true (a boolean)"),
        ("seven", "must be an integer, got 'seven'"),
    ],
)
@pytest.mark.parametrize("field", ["seed", "safety_tolerance"])
def test_integer_fields_take_plain_decimals_only(written: str, said: str, field: str) -> None:
    said = said.replace("must be an integer,", "must be an integer from 0 to 6,") if field != "seed" else said
    message = refusal(f"jobs:\n  - id: a\n    prompt: x\n    {field}: {written}\n")
    assert message == f"m.yaml:4: job 'a': field {field!r}: {said}"


@pytest.mark.parametrize(("written", "value"), [("0", 0), ("7", 7), ("-0", 0), ("42", 42), ("9007199254740992", 2**53)])
def test_plain_decimal_seeds_read_as_written(written: str, value: int) -> None:
    assert parse(f"jobs: [{{prompt: x, seed: {written}}}]\n")["seed"] == value


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("010", "write integers as plain decimals: '010' (did you mean 10?); quote it to send it as text"),
        ("16:9", "'16:9' (YAML 1.1 reads it as the base-60 number 969); quote it to send it as text"),
        ("0x1F", "'0x1F' (did you mean 31?)"),
        ("1:30.5", "write numbers as plain decimals: '1:30.5' (YAML 1.1 reads it as 90.5)"),
        ("1_000.5", "write numbers as plain decimals: '1_000.5' (YAML 1.1 reads it as 1000.5)"),
        ("yes", "YAML 1.1 reads 'yes' as true: write true or false; quote it to send it as text"),
        ("NO", "YAML 1.1 reads 'NO' as false: write true or false"),
        ("off", "YAML 1.1 reads 'off' as false"),
        ("[1, 010]", "write integers as plain decimals: '010'"),
        ("{a: 0x10}", "write integers as plain decimals: '0x10'"),
        (".inf", "must be a finite number, got inf"),
        (".nan", "must be a finite number, got nan"),
    ],
)
def test_other_models_fields_refuse_misread_numbers_and_booleans(written: str, said: str) -> None:
    message = refusal(f"model: some-model\njobs:\n  - id: a\n    prompt: x\n    v: {written}\n")
    assert message.startswith("m.yaml:5: job 'a': field 'v': ")
    assert said in message


@pytest.mark.parametrize(
    ("written", "value"),
    [("1.5", 1.5), ("-2", -2), (".5", 0.5), ("1e3", "1e3"), ("true", True), ("False", False), ("'010'", "010")],
)
def test_other_models_fields_read_plain_spellings(written: str, value: object) -> None:
    assert parse(f"model: some-model\njobs: [{{prompt: x, v: {written}}}]\n")["v"] == value


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("1:30", "field 'price': write integers as plain decimals: '1:30'"),
        ("0x10", "field 'price': write integers as plain decimals: '0x10' (did you mean 16?)"),
        ("0_10", "field 'price': write integers as plain decimals"),
        ("1_0.5", "field 'price': write numbers as plain decimals: '1_0.5'"),
        (".inf", "field 'price': must be a non-negative number, got inf"),
        (".nan", "field 'price': must be a non-negative number, got nan"),
        ("-0.1", "field 'price': must be a non-negative number"),
    ],
)
def test_price_is_a_plain_finite_number(written: str, said: str) -> None:
    assert said in refusal(f"price: {written}\njobs: [{{prompt: x}}]\n")


@pytest.mark.parametrize(("written", "price"), [("0.08", 0.08), ("0", 0.0), ("2", 2.0), (".5", 0.5)])
def test_plain_prices_read_as_written(written: str, price: float) -> None:
    assert parse_manifest(f"price: {written}\njobs: [{{prompt: x}}]\n", path=Path("m.yaml")).price == price


# --- durations and numbers on the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "positive", "said"),
    [
        ("0", True, "must be above zero"),
        ("0s", True, "must be above zero"),
        ("0.0m", True, "must be above zero"),
        ("0h0m0s", True, "must be above zero"),
        ("367d", False, "expected e.g."),
        ("400h" * 1, False, None),
        ("9000h", False, "too large"),
        ("99999999999", False, "too large"),
        ("1e3", False, "expected e.g."),
        ("inf", False, "expected e.g."),
        ("nan", True, "expected e.g."),
        ("٣s", False, "expected e.g."),  # an Arabic-Indic digit: float() would read it
    ],
)
def test_parse_duration_refuses_zero_when_positive_and_absurd_lengths(
    text: str, positive: bool, said: str | None
) -> None:
    if said is None:
        assert parse_duration(text, positive=positive) == 400 * 3600
        return
    with pytest.raises(UsageError) as caught:
        parse_duration(text, positive=positive)
    assert said in str(caught.value) and repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["0.01", "3s", "1h", "0.001s"])
def test_parse_duration_takes_small_positive_durations(text: str) -> None:
    assert parse_duration(text, positive=True) > 0


RUN = ["run", "m.yaml"]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--poll-initial", "0", "must be above zero"),
        ("--job-timeout", "0", "must be above zero"),
        ("--job-timeout", "0s", "must be above zero"),
        ("--timeout", "0", "must be above zero"),
        ("--max-runtime", "0m", "must be above zero"),
        ("--drain-timeout", "-1", "must not be negative"),
        ("--poll-min-interval", "inf", "invalid duration"),
        ("--price", "inf", "must be a finite number"),
        ("--price", "-inf", "must be a finite number"),
        ("--price", "nan", "must be a finite number"),
        ("--price", "1e999", "must be a finite number"),
        ("--price", "Infinity", "must be a finite number"),
        ("--budget", "nan", "must be a finite number"),
        ("--budget", "-1", "must be zero or more"),
        ("--concurrency", "1_0", "not a whole number"),
        ("--concurrency", "+5", "not a whole number"),
        ("--concurrency", "٣", "not a whole number"),
        ("--concurrency", "0", "must be at least 1"),
        ("--max-attempts", "9" * 40, "not a whole number"),
        ("--sim-min-seconds", "inf", "must be a finite number"),
        ("--sim-failure-rate", "1.5", "must be from 0 to 1"),
        ("--sim-image-size", "100000", "at most 4096"),
    ],
)
def test_run_options_refuse_values_that_cannot_be_meant(
    option: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args([*RUN, f"{option}={value}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and option in err[0]


@pytest.mark.parametrize(
    ("option", "value", "attribute", "parsed"),
    [
        ("--drain-timeout", "0", "drain_timeout", 0.0),  # zero: Ctrl-C stops at once, a choice worth having
        ("--poll-min-interval", "0", "poll_min_interval", 0.0),
        ("--price", "0", "price", 0.0),
        ("--budget", "0", "budget", 0.0),
        ("--poll-initial", "0.01", "poll_initial", 0.01),
        ("--concurrency", " 7 ", "concurrency", 7),
    ],
)
def test_run_options_take_zero_where_zero_means_something(
    option: str, value: str, attribute: str, parsed: float
) -> None:
    assert getattr(cli.build_parser().parse_args([*RUN, option, value]), attribute) == parsed


@pytest.mark.parametrize(("value", "said"), [("99999", "not a TCP port"), ("-1", "not a whole number"), ("x", "not")])
def test_simulate_port_is_a_tcp_port(value: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["simulate", "--port", value])
    assert said in capsys.readouterr().err


def test_no_infinity_reaches_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("jobs: [{prompt: x}]\n", encoding="utf-8")
    for price in ("inf", "nan", "1e400"):
        with pytest.raises(SystemExit) as caught:
            cli.main(["plan", str(manifest), "--output", str(tmp_path / "o"), "--json", "--price", price])
        assert caught.value.code == 2
    assert cli.main(["plan", str(manifest), "--output", str(tmp_path / "o"), "--json", "--price", "0.5"]) == 0
    out = capsys.readouterr().out
    json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


def test_argument_helpers_raise_argparse_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        options._positive_duration("0")


# --- input URLs the API can fetch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://user:secret@cdn.example.com/a.png", "user name or password"),
        ("https://user@cdn.example.com/a.png", "user name or password"),
        ("https://@cdn.example.com/a.png", "user name or password"),
        ("https://cdn.example.com/a b.png", "U+0020 (space)"),
        ("https://cdn.example.com/a\tb.png", "U+0009"),
        ("https://cdn.example.com/a\u200bb.png", "U+200B (zero width space)"),
        ("https://cdn.example.com/a\u202eb.png", "U+202E"),
        ("https://cdn.example.com/\u00a0.png", "U+00A0"),
        ("https://cdn.example.com/" + "a" * 2100, "more than 2,048"),
        ("https:///a.png", "no host"),
        ("https://:443/a.png", "no host"),
        ("http://[::1/a.png", "cannot be read"),
        ("https://cdn.example.com:99999/a.png", "cannot be read"),
        ("https://cdn.example.com:port/a.png", "cannot be read"),
        ("https://cdn..example.com/a.png", "not a valid host name"),
        ("https://cdn.exa$mple.com/a.png", "not a valid host name"),
        (f"https://{'a' * 64}.example.com/a.png", "not a valid host name"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://example.com/a.png", "scheme 'gopher'"),
    ],
)
def test_url_the_api_could_not_fetch_is_refused_in_the_manifest(url: str, said: str) -> None:
    message = refusal(f"jobs:\n  - id: a\n    prompt: x\n    input_image: {json.dumps(url)}\n")
    assert message.startswith("m.yaml:4: job 'a': field 'input_image': ")
    assert said in message
    assert "secret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/a.png",
        "http://example.com/photos/Harbour%20View.PNG?x=1#frag",
        "https://cdn.example.com/café.png",
        "https://bücher.example/a.png",
        "https://cdn.example.com:8443/a.png",
        "https://[2606:4700::1111]/a.png",
        "https://8.8.8.8/a.png",
    ],
)
def test_url_the_api_can_fetch_passes(url: str) -> None:
    assert parse(f"jobs: [{{prompt: x, input_image: {json.dumps(url)}}}]\n")["input_image"] == url


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1/a.png", "127.0.0.1 is a loopback address"),
        ("http://127.1/a.png", "127.0.0.1 is a loopback address"),
        ("http://2130706433/a.png", "127.0.0.1 is a loopback address"),
        ("http://0x7f.0.0.1/a.png", "127.0.0.1 is a loopback address"),
        ("http://[::1]/a.png", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/a.png", "127.0.0.1 is a loopback address"),
        ("http://0.0.0.0:8080/a.png", "0.0.0.0 is an unspecified address"),
        ("http://10.1.2.3/a.png", "10.1.2.3 is a private address"),
        ("http://172.16.0.9/a.png", "a private address"),
        ("http://192.168.1.20/a.png", "a private address"),
        ("http://[fd00::1]/a.png", "a private address"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
        ("http://[fe80::1]/a.png", "a link-local address"),
        ("http://100.64.0.1/a.png", "a non-public address"),
        ("http://224.0.0.1/a.png", "a multicast address"),
        ("http://localhost:8080/a.png", "localhost is the machine itself"),
        ("http://LocalHost./a.png", "localhost is the machine itself"),
        ("http://api.localhost/a.png", "localhost is the machine itself"),
        ("http://nas.local/a.png", "'.local'"),
        ("http://files.internal/a.png", "'.internal'"),
        ("http://printer.home.arpa/a.png", "'.home.arpa'"),
        ("https://uploads.invalid/a.png", "'.invalid'"),
        ("https://example.com/a.png", None),
        ("https://93.184.216.34/a.png", None),
        ("https://deadbeef.example.com/a.png", None),
        ("https://10.example.com/a.png", None),
    ],
)
def test_unfetchable_host(url: str, said: str | None) -> None:
    why = unfetchable_host(url)
    assert (why is None) if said is None else (why is not None and said in why)


def test_local_url_is_refused_before_paying_naming_job_and_line() -> None:
    text = "jobs:\n  - {id: ok, prompt: x, input_image: 'https://cdn.example.com/a.png'}\n"
    text += "  - {id: lan, prompt: y, input_image: 'http://192.168.1.20/a.png'}\n"
    manifest = parse_manifest(text, path=Path("m.yaml"))
    with pytest.raises(ManifestError) as caught:
        check_url_hosts(manifest, "https://api.eachlabs.ai")
    assert str(caught.value) == (
        "m.yaml:3: job 'lan': field 'input_image': the API cannot fetch 'http://192.168.1.20/a.png': "
        "192.168.1.20 is a private address; use a public URL, or a local file (it is uploaded)"
    )
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "api", ["http://127.0.0.1:8787", "http://localhost:9000", "http://10.0.0.2", "http://[::1]:80"]
)
def test_local_urls_pass_when_the_api_is_local_too(api: str) -> None:
    manifest = parse_manifest("jobs: [{prompt: x, input_image: 'http://127.0.0.1:1/a.png'}]\n", path=Path("m.yaml"))
    check_url_hosts(manifest, api)  # a simulator or a server of your own reaches its own network
