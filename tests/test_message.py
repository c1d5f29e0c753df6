"""roundtrip.message.ReceivedMessage against the corpus, and its failure modes."""

from __future__ import annotations

import email.parser
import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.errors import MissingHeaderBodySeparatorDefect

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from roundtrip.corpus import CorpusMessage, iter_corpus, large_message, nested_message
from roundtrip.message import Attachment, Headers, ReceivedMessage, parse_received

CORPUS = iter_corpus()
UTF8_LINES = [
    "Grüße aus Köln! Ça va? ¿Qué tal?",
    "Ελληνικά: καλημέρα κόσμε",
    "Русский: съешь же ещё этих мягких булок",
    "日本語: こんにちは、世界",
    "Emoji: 📬 ✉️ ✅",
    "Math: ∀x ∈ ℝ, x² ≥ 0",  # noqa: RUF001
]


def parse(prefix: str) -> ReceivedMessage:
    (found,) = [m for m in CORPUS if m.name.startswith(prefix)]
    return ReceivedMessage(found.raw)


# -- every corpus file ----------------------------------------------------------------------


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_message_parses_every_corpus_file(message: CorpusMessage) -> None:
    parsed = ReceivedMessage(message.raw)
    assert parsed.parse_error is None
    assert parsed.raw == message.raw
    assert parsed.from_ is not None and parsed.from_.endswith("@example.com")
    assert parsed.to and all(a.endswith("@example.org") for a in parsed.to + parsed.cc)
    assert parsed.message_id == f"<corpus-{message.name[:2]}@example.com>"
    assert parsed.date is not None and parsed.date.tzinfo is not None
    assert parsed.text is not None or parsed.html is not None
    assert message.name[:2] in repr(parsed.message_id)
    assert parsed.summary().endswith(f"({len(message.raw)} bytes)")


# -- headers and addresses ------------------------------------------------------------------


def test_message_decodes_rfc2047_subject_and_names() -> None:
    parsed = parse("06-")
    assert parsed.subject == "Rendez-vous à la cafétéria – jeudi à 12h"  # noqa: RUF001
    assert parsed.headers.get("From") == "François Dupré <user@example.com>"
    assert parsed.headers.get("To") == "Åsa Lindström <user@example.org>"
    assert parsed.headers.get("X-Note") == "plain text with = and _ escaped"


def test_message_decodes_rfc6532_utf8_headers() -> None:
    parsed = parse("05-")
    assert parsed.subject == "Überweisung bestätigt: 1 250,00 € für Café Ñandú"
    assert parsed.from_ == "jürgen@example.com"
    assert parsed.to == ["user@example.org"]
    assert parsed.cc == ["zoë@example.org"]
    assert parsed.headers["Cc"] == "Zoë Ångström <zoë@example.org>"


def test_message_unfolds_long_headers() -> None:
    parsed = parse("07-")
    assert "\n" not in parsed.subject and "\r" not in parsed.subject
    assert parsed.subject.startswith("This subject line is deliberately far longer")
    assert "characters so that it has to be folded" in parsed.subject
    assert len(parsed.to) == 13
    refs = parsed.headers["References"]
    assert len(re.findall(r"<thread-\d{3}\.x+@example\.com>", refs)) == 15
    assert parsed.headers["X-Long-Encoded"].endswith("damit keine Zeile zu lang wird — Ende")


def test_message_addresses_flatten_groups_and_keep_sender() -> None:
    parsed = parse("28-")
    assert parsed.to == [
        "user@example.org",
        "jane.doe@example.org",
        "dev1@example.org",
        "dev2@example.org",
    ]
    assert parsed.cc == ["carol@example.org", "dave+tag@example.org"]
    assert parsed.from_ == "user@example.com"
    assert parsed.sender == "robot@example.com"
    assert parsed.headers["Bcc"] == "undisclosed-recipients:;"


def test_message_sender_defaults_to_from() -> None:
    parsed = parse("01-")
    assert parsed.sender == parsed.from_ == "user@example.com"
    assert parsed.cc == []


def test_message_headers_are_case_insensitive_multi_values() -> None:
    headers = parse("35-").headers
    assert headers.get_all("x-trace") == ["first", "second", "third"]
    assert headers.get("X-TRACE") == "first"
    assert headers.get("subject") == headers["Subject"] == "Header names in odd case"
    assert headers.get("X-Empty") == ""
    assert "x-empty" in headers
    assert headers.get("X-No-Space") == "value-without-space"
    assert headers.get("X-Tab") == "value after tab"
    assert headers.keys()[0] == "FROM"
    assert len(headers) == len(list(headers)) == 13


def test_message_headers_absent_names() -> None:
    headers = parse("35-").headers
    assert headers.get("X-Missing") is None
    assert headers.get("X-Missing", "fallback") == "fallback"
    assert headers.get_all("X-Missing") == []
    assert "X-Missing" not in headers
    assert 42 not in headers
    with pytest.raises(KeyError):
        headers["X-Missing"]


def test_message_date_and_message_id() -> None:
    parsed = parse("05-")
    assert parsed.date == datetime(2024, 6, 3, 8, 20, tzinfo=timezone(timedelta(hours=2)))
    assert parsed.message_id == "<corpus-05@example.com>"


def test_message_missing_or_bad_headers_are_none() -> None:
    parsed = ReceivedMessage(b"Date: yesterday-ish\r\nTo: <<<@@>>\r\n\r\nbody\r\n")
    assert parsed.date is None
    assert parsed.message_id is None
    assert parsed.from_ is None and parsed.sender is None
    assert parsed.subject == ""
    assert parsed.text == "body\n"
    assert parsed.summary().startswith("<no sender> -> ")


# -- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["02-", "04-"])
def test_message_text_decodes_utf8_8bit_and_base64(prefix: str) -> None:
    assert parse(prefix).text == "\n".join(UTF8_LINES) + "\n"


def test_message_text_decodes_quoted_printable() -> None:
    text = parse("03-").text
    assert text is not None
    assert "Grüße, naïve café, 日本語." in text
    assert "a = b, and 100% = 1." in text
    assert "soft line breaks in the middle of it, which a decoder" in text
    assert "Trailing space at the end of this line   \n" in text


def test_message_text_decodes_legacy_charsets() -> None:
    parsed = parse("24-")
    assert parsed.text == "Déjà vu: l'été à Zürich coûte 5 £ (ISO-8859-1).\n"
    (second,) = parsed.inline_parts
    assert second.content_type == "text/plain"
    price = "Price: 20 € – “smart quotes”"  # noqa: RUF001
    assert second.data.decode("windows-1252").startswith(price)


def test_message_text_is_first_of_many_charsets() -> None:
    parsed = parse("34-")
    assert parsed.text == "UTF-8 first: ça marche.\n"
    assert [p.content_type for p in parsed.inline_parts] == ["text/plain"] * 3


def test_message_text_keeps_whitespace_and_dots() -> None:
    flowed = parse("31-").text
    assert flowed is not None
    assert "ends in a \nspace" in flowed and "Trailing tab\t\n   \n\t\n" in flowed
    assert "-- \nAlice" in flowed
    dots = parse("20-").text
    assert dots is not None
    assert dots.splitlines()[1:4] == [".", "..", "..."]
    assert dots.endswith("\n.\n")


def test_message_text_and_html_of_alternative() -> None:
    parsed = parse("09-")
    assert parsed.text is not None and parsed.text.startswith("Your weekly digest\n")
    assert parsed.html is not None and "<h1>Your weekly digest</h1>" in parsed.html
    assert parsed.attachments == [] and parsed.inline_parts == []


def test_message_text_attachments_do_not_become_the_body() -> None:
    parsed = parse("32-")
    assert parsed.text is None
    assert parsed.html is not None and "file index" in parsed.html
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("notes.txt", "text/plain"),
        ("table.csv", "text/csv"),
    ]
    assert parsed.attachments[0].data == b"These notes are an attachment, not the message body.\r\n"


def test_message_empty_body() -> None:
    parsed = parse("27-")
    assert parsed.text == ""
    assert parsed.subject == ""
    assert parsed.body == b""
    assert parsed.body_sha256 == hashlib.sha256(b"").hexdigest()


def test_message_bare_lf_message_parses() -> None:
    parsed = parse("22-")
    assert parsed.subject == "Saved with Unix line endings"
    assert parsed.text is not None and parsed.text.startswith("Every line of this file")
    assert parsed.body.startswith(b"Every line")


# -- attachments and inline parts -----------------------------------------------------------


def test_message_attachment_pdf() -> None:
    (pdf,) = parse("11-").attachments
    assert pdf == Attachment("report.pdf", "application/pdf", pdf.data, None, False)
    assert pdf.data.startswith(b"%PDF-1.4") and pdf.data.endswith(b"%%EOF\n")
    assert pdf.size == len(pdf.data)


def test_message_attachment_png_and_binary() -> None:
    (png,) = parse("12-").attachments
    assert (png.filename, png.content_type) == ("chart.png", "image/png")
    assert png.data.startswith(b"\x89PNG\r\n\x1a\n")
    (blob,) = parse("13-").attachments
    assert blob.size == 4096 and blob.data[:1024] == bytes(range(256)) * 4


def test_message_attachment_zero_bytes() -> None:
    (empty,) = parse("14-").attachments
    assert (empty.filename, empty.data, empty.inline) == ("empty.dat", b"", False)


def test_message_attachment_international_filenames() -> None:
    names = [a.filename for a in parse("15-").attachments]
    assert names == ["Résumé final.txt", "議事録の補足資料.bin", "café.txt", "отчёт.bin"]
    assert parse("15-").attachments[2].data == b"caf\xe9 cr\xe8me\r\n"


def test_message_inline_images_match_cid_links() -> None:
    parsed = parse("10-")
    assert parsed.attachments == []
    cids = [p.content_id for p in parsed.inline_parts]
    assert cids == ["logo.png@example.com", "banner@example.com"]
    assert all(p.inline and p.content_type == "image/png" for p in parsed.inline_parts)
    assert [p.filename for p in parsed.inline_parts] == ["logo.png", None]
    assert parsed.links == [f"cid:{cid}" for cid in cids]


def test_message_nested_parts() -> None:
    parsed = parse("16-")
    assert parsed.text is not None and parsed.text.startswith("Nested body")
    assert parsed.html is not None and "three levels down" in parsed.html
    assert [a.filename for a in parsed.attachments] == ["numbers.csv", "nested.bin"]
    (icon,) = parsed.inline_parts
    assert (icon.filename, icon.content_id) == ("icon.png", "icon@example.com")


def test_message_forwarded_message_is_an_attachment() -> None:
    parsed = parse("17-")
    (forwarded,) = parsed.attachments
    assert forwarded.content_type == "message/rfc822"
    assert forwarded.filename == "Lunch on Thursday.eml"
    inner = ReceivedMessage(forwarded.data)
    assert inner.subject == "Lunch on Thursday?"
    assert inner.from_ == "carol@example.com"
    assert inner.find_link("canteen") == "https://canteen.example.com/menu"
    # The outer message's own links do not include the forwarded message's.
    assert parsed.links == []


def test_message_calendar_invite() -> None:
    parsed = parse("18-")
    (calendar,) = parsed.inline_parts
    assert calendar.content_type == "text/calendar"
    assert b"METHOD:REQUEST" in calendar.data
    (ics,) = parsed.attachments
    assert (ics.filename, ics.content_type) == ("invite.ics", "application/ics")
    assert ics.data == calendar.data


def test_message_signed_message_signature_is_attachment() -> None:
    parsed = parse("19-")
    assert parsed.text is not None and parsed.text.startswith("Release 1.2.3 is out.")
    (signature,) = parsed.attachments
    assert signature.content_type == "application/pgp-signature"
    assert signature.data.startswith(b"-----BEGIN PGP SIGNATURE-----")


def test_message_without_parts_has_no_attachments() -> None:
    parsed = parse("01-")
    assert parsed.attachments == [] and parsed.inline_parts == []
    assert parsed.html is None


# -- links and codes ------------------------------------------------------------------------


def test_message_links_in_order_deduplicated_and_cleaned() -> None:
    parsed = parse("26-")
    assert parsed.links == [
        "https://accounts.example.com/reset?token=3f9a1c7e5b2d4f60&user=17",
        "https://help.example.com/reset",  # "<...>." around it stripped
        "https://accounts.example.com/unsubscribe?u=17",  # trailing "." stripped
        "mailto:support@example.com",
        "https://track.example.com/open.gif?m=26",
    ]


def test_message_find_link_literal_regex_and_compiled() -> None:
    parsed = parse("26-")
    reset = "https://accounts.example.com/reset?token=3f9a1c7e5b2d4f60&user=17"
    assert parsed.find_link("/reset?token=") == reset  # literal, although "?" is a metachar
    assert parsed.find_link(r"token=[0-9a-f]{16}") == reset
    assert parsed.find_link(re.compile(r"open\.gif")) == "https://track.example.com/open.gif?m=26"
    assert parsed.find_link("mailto:") == "mailto:support@example.com"


def test_message_find_link_failure_lists_links() -> None:
    parsed = parse("26-")
    with pytest.raises(AssertionError) as info:
        parsed.find_link("/verify-email")
    text = str(info.value)
    assert "no link matches '/verify-email'" in text
    assert "Reset your password" in text
    assert "the 5 link(s) found:" in text
    assert "  - https://accounts.example.com/reset?token=3f9a1c7e5b2d4f60&user=17" in text
    with pytest.raises(AssertionError, match=r"no link matches 'x\(' "):
        parsed.find_link("x(")  # invalid regex: literal match only, still a readable error


def test_message_find_link_failure_without_links() -> None:
    with pytest.raises(AssertionError, match="has no links in its text or HTML body"):
        parse("01-").find_link(re.compile("https://"))


def test_message_find_code_ignores_decoys() -> None:
    parsed = parse("25-")
    assert parsed.find_code() == "482913"
    assert parsed.find_code(r"code is: (\d+)") == "482913"
    assert parsed.find_code(re.compile(r"Order (\d+)")) == "12345"


def test_message_find_code_searches_html_then_subject() -> None:
    html_only = ReceivedMessage(
        b"Subject: Code 111111\r\nContent-Type: text/html\r\n\r\n"
        b"<p>Use <script>var x = 999999;</script><b>222222</b></p>\r\n"
    )
    assert html_only.find_code() == "222222"  # visible text before Subject, scripts skipped
    subject_only = ReceivedMessage(b"Subject: Your code 333333\r\n\r\nno digits here\r\n")
    assert subject_only.find_code() == "333333"


def test_message_find_code_failure_is_readable() -> None:
    parsed = parse("09-")
    with pytest.raises(AssertionError) as info:
        parsed.find_code()
    text = str(info.value)
    assert "no code matches '\\\\b\\\\d{6}\\\\b'" in text
    assert "text body: 'Your weekly digest" in text
    assert "Subject: 'Your weekly digest'" in text


# -- raw body hash, Received chain, summary -------------------------------------------------


def test_message_body_sha256_ignores_prepended_trace_headers() -> None:
    raw = parse("01-").raw
    body = raw.split(b"\r\n\r\n", 1)[1]
    stored = ReceivedMessage(b"Return-Path: <user@example.com>\r\nReceived: from x by y\r\n" + raw)
    assert stored.body_sha256 == parse("01-").body_sha256 == hashlib.sha256(body).hexdigest()


def test_message_body_sha256_changes_with_the_body() -> None:
    raw = parse("20-").raw
    unstuffed = raw.replace(b"\r\n..\r\n", b"\r\n.\r\n")
    assert ReceivedMessage(unstuffed).body_sha256 != ReceivedMessage(raw).body_sha256


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"Subject: A\n\r\nbody\r\n", b"body\r\n"),  # an LF field, then a CRLF empty line
        (b"Subject: A\r\n\nbody\n", b"body\n"),  # a CRLF field, then an LF empty line
        (b"Subject: A\n\rbody\r", b"body\r"),  # bare CR: email/feedparser.py ends lines so
        (b"Subject: A\r\rbody\r", b"body\r"),
        (b"Subject: A\r\r\nbody\r\n", b"body\r\n"),
        (b"\rbody\r\n", b"body\r\n"),
    ],
)
def test_message_body_after_mixed_line_endings(raw: bytes, body: bytes) -> None:
    parsed = ReceivedMessage(raw)
    assert parsed.subject == ("" if raw.startswith(b"\r") else "A")
    assert parsed.body == body
    assert parsed.body_sha256 == hashlib.sha256(body).hexdigest()
    # ``text`` is parsed by the email package: the same split, CRLF read as LF.
    assert parsed.text == body.decode().replace("\r\n", "\n")


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        # The twins: one line ending throughout splits where it always did, and an empty
        # line of another kind further down the body does not move the split.
        (b"Subject: A\r\nTo: b@example.org\r\n\r\nbody\n\nmore\n\r\n", b"body\n\nmore\n\r\n"),
        (b"Subject: A\nTo: b@example.org\n\nbody\r\n\r\nmore\r\r", b"body\r\n\r\nmore\r\r"),
        (b"Subject: A\r\n\r\n", b""),
        (b"Subject: A\r\n", b""),  # no empty line: all header
        (b"\r\nSubject: A\r\n\r\nbody\r\n", b"Subject: A\r\n\r\nbody\r\n"),
        (b"\nSubject: A\n\nbody\n", b"Subject: A\n\nbody\n"),
    ],
)
def test_message_body_after_one_kind_of_line_ending(raw: bytes, body: bytes) -> None:
    parsed = ReceivedMessage(raw)
    assert parsed.body == body
    assert parsed.body_sha256 == hashlib.sha256(body).hexdigest()
    assert parsed.subject == ("A" if raw.startswith(b"S") else "")


_EOL = st.sampled_from([b"\r\n", b"\n", b"\r"])


@settings(max_examples=300, deadline=None, database=None)
@given(
    fields=st.lists(st.tuples(st.sampled_from([b"X-A: 1", b"Subject: s", b" fold"]), _EOL)),
    empty=_EOL,
    body=st.lists(st.sampled_from([b"x", b"\r\n", b"\n", b"\r", b"Y: 2"])),
)
def test_message_body_where_the_email_package_splits(
    fields: list[tuple[bytes, bytes]], empty: bytes, body: list[bytes]
) -> None:
    """Fields with any line endings, then an empty line of any kind: ``body`` is the
    payload the stdlib email parser leaves below its header (email/feedparser.py)."""
    raw = b"".join(f + eol for f, eol in fields) + empty + b"".join(body)
    parsed = email.parser.BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
    # A line that is no field also ends the header there (a CR, then the "empty" LF, is one
    # CRLF): that rule is not this one.
    assume(not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in parsed.defects))
    payload = parsed.get_payload()
    assert isinstance(payload, str)
    assert ReceivedMessage(raw).body == payload.encode("ascii", "surrogateescape")


def test_message_received_chain() -> None:
    chain = parse("29-").received_chain
    assert [(h.from_, h.by, h.with_, h.tls) for h in chain] == [
        ("mx.example.org", "imap.example.org", "LMTP", False),
        ("smtp.example.com", "mx.example.org", "ESMTPS", True),
        ("[203.0.113.9]", "smtp.example.com", "ESMTPSA", True),
        ("localhost", "client.example.com", "ESMTP", False),
    ]
    assert chain[0].for_ == "user@example.org" and chain[0].id == "7yQ2B0x3XWYAAQ"
    assert chain[3].for_ is None
    assert chain[1].timestamp == datetime(2024, 6, 3, 10, 20, 4, tzinfo=UTC)
    assert chain[2].timestamp == chain[1].timestamp - timedelta(seconds=3)
    assert "(using TLSv1.3" in chain[1].raw


def test_message_received_chain_empty_without_trace() -> None:
    assert parse("01-").received_chain == []


def test_parse_received_tolerates_garbage() -> None:
    hop = parse_received("garbage; not a date")
    assert (hop.from_, hop.by, hop.with_, hop.timestamp, hop.tls) == (None, None, None, None, False)
    hop = parse_received("from a (comment with by b) by c (version=TLS1_3) id 1")
    assert (hop.from_, hop.by, hop.id, hop.tls, hop.timestamp) == ("a", "c", "1", True, None)


def test_message_summary() -> None:
    assert parse("01-").summary() == (
        "user@example.com -> user@example.org: Plain ASCII status note (484 bytes)"
    )
    assert repr(parse("01-")).startswith("<ReceivedMessage user@example.com -> ")


# -- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1000, 3000])
def test_message_deep_nesting_falls_back_to_raw(depth: int) -> None:
    raw = nested_message(depth)
    parsed = ReceivedMessage(raw)
    assert parsed.parse_error is not None and "RecursionError" in parsed.parse_error
    assert parsed.subject == f"Nested {depth} levels deep"
    assert parsed.to == ["user@example.org"]
    assert parsed.raw == raw
    assert parsed.text is None and parsed.attachments == [] and parsed.links == []
    assert parsed.body_sha256 == hashlib.sha256(parsed.body).hexdigest()


def test_message_moderate_nesting_parses_fully() -> None:
    parsed = ReceivedMessage(nested_message(100))
    assert parsed.parse_error is None
    assert parsed.text == "bottom"


def test_message_garbage_input_does_not_raise() -> None:
    for raw in (
        b"",
        b"\x00\xff\xfe",
        b"no colon here\r\n",
        b"Content-Type: multipart/mixed\r\n\r\n",
    ):
        parsed = ReceivedMessage(raw)
        assert parsed.raw == raw
        assert isinstance(parsed.headers, Headers)


def test_message_large_message_10mb() -> None:
    size = 10 * 1024 * 1024
    parsed = ReceivedMessage(large_message(size))
    (blob,) = parsed.attachments
    assert blob.size == size and blob.filename == f"random-{size}.bin"


SMALL = [m.raw for m in CORPUS if len(m.raw) < 20_000]


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    base=st.sampled_from(SMALL),
    cut=st.integers(min_value=0, max_value=20_000),
    junk=st.binary(max_size=40)
    | st.sampled_from([b"=?", b"=?UTF-8?B?", b"*0*=", b'"', b"(", b"<", b"\r\n--", b"\xff\xfe"]),
)
def test_message_mutated_corpus_never_raises(base: bytes, cut: int, junk: bytes) -> None:
    cut %= len(base) + 1
    raw = base[:cut] + junk + base[cut:]
    parsed = ReceivedMessage(raw)
    assert parsed.raw == raw
    assert isinstance(parsed.summary(), str)
    assert isinstance(parsed.links, list)


#: Inputs on which ``ReceivedMessage`` raised (found by the mutation test above and by a fuzz
#: around it): a NUL in a charset name (ValueError from the codec lookup), charsets that are
#: codecs but not charsets (UnicodeError), Content-Type parameters the email package's header
#: parser chokes on, a zone offset that overflows timedelta, and html.parser's own errors.
HOSTILE = {
    "nul-in-charset": b"Content-Type: text/plain; charset=us-\x00ascii\r\n\r\nbody\r\n",
    "idna-charset": b"Content-Type: text/plain; charset=idna\r\n\r\nxn--\r\n",
    "undefined-charset": b"Content-Type: text/plain; charset=undefined\r\n\r\nbody\r\n",
    "rfc2231-nul-charset": b"Content-Type: text/plain; name*=a\x00''x\r\n\r\nbody\r\n",
    "trailing-star-param": b"Content-Type: text/plain; c*\r\n\r\nbody\r\n",
    "rfc2231-utf16-odd": b"Content-Type: text/plain; name*=utf-16''%41\r\n\r\nbody\r\n",
    "html-charref-5000-digits": b"Content-Type: text/html\r\n\r\n<p>&#" + b"1" * 5000 + b";</p>",
    "html-marked-section": b"Content-Type: text/html\r\n\r\n<p>a</p><![foo[ x ]]><p>b</p>",
    "date-zone-overflow": b"Date: Mon, 3 Jun 2024 10:00:00 +99999999999999999999\r\n\r\nx\r\n",
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_message_hostile_input_never_raises(raw: bytes) -> None:
    parsed = ReceivedMessage(raw)
    assert parsed.raw == raw
    assert isinstance(parsed.summary(), str)
    assert isinstance(parsed.links, list)


def test_message_hostile_input_twin_a_real_charset_still_decodes() -> None:
    """The codec errors above fall back to UTF-8; a charset that exists is still used."""
    raw = b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    assert ReceivedMessage(raw).text == "caf\u00e9\n"
    broken = b"Content-Type: text/plain; charset=us-\x00ascii\r\n\r\ncaf\xc3\xa9\r\n"
    assert ReceivedMessage(broken).text == "caf\u00e9\n"  # UTF-8, the fallback
    # An unparsable Content-Type keeps the headers and says why.
    parsed = ReceivedMessage(HOSTILE["trailing-star-param"])
    assert parsed.headers.get("Content-Type") == "text/plain; c*"
    assert parsed.parse_error is not None and "could not parse the MIME" in parsed.parse_error
    assert ReceivedMessage(b"Content-Type: text/plain\r\n\r\nbody\r\n").parse_error is None
