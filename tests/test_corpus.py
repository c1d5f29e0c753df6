"""The regression corpus in fixtures/corpus and its loader, roundtrip.corpus."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from email.message import Message
from pathlib import Path

import pytest

from roundtrip import corpus
from roundtrip.corpus import (
    BYTE_IDENTICAL_BLOCKERS,
    CorpusMessage,
    corpus_dir,
    corpus_params,
    iter_corpus,
    large_message,
    large_payload,
    load,
    nested_message,
    read_index,
)

CORPUS = iter_corpus()
KNOWN_FLAGS = BYTE_IDENTICAL_BLOCKERS | {"8bitmime", "smtputf8"}
BARE_LF = re.compile(rb"(?<!\r)\n")
BARE_CR = re.compile(rb"\r(?!\n)")


def by_name(prefix: str) -> CorpusMessage:
    (found,) = [m for m in CORPUS if m.name.startswith(prefix)]
    return found


# -- the corpus as data ---------------------------------------------------------------------


def test_corpus_dir_is_the_checkout_fixtures() -> None:
    assert corpus_dir() == Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
    assert corpus_dir().is_dir()


def test_corpus_packaged_copy_equals_the_checkout() -> None:
    """roundtrip/_corpus ships in the wheel; it must be fixtures/corpus, byte for byte."""
    packaged = Path(corpus.__file__).resolve().parent / "_corpus"
    source = corpus_dir()
    names = {p.name for p in source.iterdir() if p.suffix in (".eml", ".tsv")}
    copied = {p.name for p in packaged.iterdir() if p.suffix in (".eml", ".tsv")}
    assert copied == names, (
        "run: cp fixtures/corpus/*.eml fixtures/corpus/INDEX.tsv roundtrip/_corpus/"
    )
    differ = [n for n in sorted(names) if (source / n).read_bytes() != (packaged / n).read_bytes()]
    assert differ == [], (
        "run: cp fixtures/corpus/*.eml fixtures/corpus/INDEX.tsv roundtrip/_corpus/"
    )


def test_corpus_dir_falls_back_to_the_packaged_copy(tmp_path: Path) -> None:
    """The twin of the checkout case: without fixtures/ beside the package, the copy is used."""
    shutil.copytree(
        Path(corpus.__file__).resolve().parent,
        tmp_path / "roundtrip",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    script = (
        "import roundtrip.corpus as c, sys; d = c.corpus_dir(); "
        "print(d); print(len(c.corpus_params())); print(c.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    where, count, module = result.stdout.split("\n")[:3]
    assert module.startswith(str(tmp_path))
    assert where == str(tmp_path / "roundtrip" / "_corpus")
    assert int(count) == len(CORPUS)


_NO_INDEX = ("No matching distribution", "Could not find a version", "network", "resolve")


@pytest.mark.timeout(180)
def test_corpus_ships_in_the_wheel(tmp_path: Path) -> None:
    """Build a wheel from the package's files, install it in a fresh venv, count the corpus.

    Offline as far as the machine allows: the build backend comes from the configured pip
    index (a local one works), the wheel is installed with --no-deps --no-index into a venv
    that sees this interpreter's packages. Skipped when no build backend can be had.
    """
    root = Path(corpus.__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    shutil.copytree(
        root / "roundtrip", src / "roundtrip", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build = subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "-w", str(tmp_path / "whl")],
        capture_output=True,
        text=True,
        timeout=150,
    )
    if build.returncode != 0 and any(word in build.stderr for word in _NO_INDEX):
        pytest.skip(f"no build backend available: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "whl").glob("roundtrip-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=60,
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=60,
    )
    script = (
        "import roundtrip.corpus as c; d = c.corpus_dir(); "
        "print(c.__file__); print(d); print(len(list(d.glob('*.eml')))); "
        "print(len(c.corpus_params()))"
    )
    result = subprocess.run(
        [str(python), "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    module, where, files, params = result.stdout.split("\n")[:4]
    assert module.startswith(str(venv)), "the venv imported another roundtrip"
    assert where.startswith(str(venv)) and where.endswith("_corpus")
    assert int(files) == int(params) == len(CORPUS) == 35


def test_corpus_has_at_least_25_messages() -> None:
    assert len(CORPUS) >= 25
    assert all(m.name.endswith(".eml") for m in CORPUS)


def test_corpus_index_lists_every_file_and_only_existing_files() -> None:
    index = read_index()
    on_disk = {p.name for p in corpus_dir().glob("*.eml")}
    assert set(index) - on_disk == set(), "INDEX.tsv lists files that do not exist"
    assert on_disk - set(index) == set(), "files missing from INDEX.tsv"


def test_corpus_index_lines_are_well_formed() -> None:
    lines = (corpus_dir() / "INDEX.tsv").read_text(encoding="utf-8").splitlines()
    names = []
    for line in lines:
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        assert len(fields) in (2, 3), f"bad INDEX.tsv line {line!r}"
        assert fields[1].strip(), f"empty description for {fields[0]}"
        names.append(fields[0])
    assert len(names) == len(set(names)), "duplicate INDEX.tsv entries"
    for message in CORPUS:
        assert message.description
        assert message.flags <= KNOWN_FLAGS, f"{message.name}: unknown flags {message.flags}"


def test_corpus_gitattributes_keep_eml_bytes() -> None:
    text = (corpus_dir().parent / ".gitattributes").read_text(encoding="utf-8")
    assert re.search(r"^\*\.eml\s+-text\s*$", text, re.MULTILINE)


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_corpus_line_endings_match_flags(message: CorpusMessage) -> None:
    has_bare_lf = bool(BARE_LF.search(message.raw))
    has_bare_cr = bool(BARE_CR.search(message.raw))
    assert has_bare_lf == ("bare-lf" in message.flags)
    assert has_bare_cr == ("bare-cr" in message.flags)
    ends_with_newline = message.raw.endswith(b"\n")
    assert ends_with_newline == ("no-final-newline" not in message.flags)


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_corpus_lines_fit_998_octets(message: CorpusMessage) -> None:
    longest = max(len(line) for line in re.split(rb"\r\n|\n|\r", message.raw))
    assert longest <= 998


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_corpus_8bit_octets_only_where_flagged(message: CorpusMessage) -> None:
    is_8bit = any(byte > 127 for byte in message.raw)
    assert is_8bit == bool(message.flags & {"8bitmime", "smtputf8"})
    head = message.raw.split(b"\r\n\r\n", 1)[0]
    assert any(byte > 127 for byte in head) == ("smtputf8" in message.flags)


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_corpus_parses_with_email_without_defects(message: CorpusMessage) -> None:
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    defects = [(part.get_content_type(), part.defects) for part in parsed.walk() if part.defects]
    assert defects == []
    assert parsed["Message-ID"] == f"<corpus-{message.name[:2]}@example.com>"


@pytest.mark.parametrize("message", CORPUS, ids=str)
def test_corpus_addresses_stay_in_example_domains(message: CorpusMessage) -> None:
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    (sender,) = parsed["From"].addresses
    assert sender.domain == "example.com"
    recipients = message.header_recipients
    assert recipients, "no To/Cc recipients"
    assert all(addr.endswith("@example.org") for addr in recipients), recipients


def test_corpus_params_ids_are_file_names(request: pytest.FixtureRequest) -> None:
    message = corpus_params()[0]
    assert str(message) == message.name == "01-plain-ascii.eml"
    assert "raw" not in repr(message)  # reprs stay short in pytest output


@pytest.mark.parametrize("message", corpus_params()[:2], ids=str)
def test_corpus_params_work_with_parametrize(
    message: CorpusMessage, request: pytest.FixtureRequest
) -> None:
    assert request.node.callspec.id == message.name


def test_corpus_params_byte_identical_only_drops_flagged() -> None:
    everything = corpus_params()
    identical = corpus_params(byte_identical_only=True)
    dropped = {m.name for m in everything} - {m.name for m in identical}
    assert dropped == {m.name for m in everything if m.flags & BYTE_IDENTICAL_BLOCKERS}
    assert {"21-no-final-newline.eml", "22-bare-lf-unix.eml", "23-stray-cr-lf.eml"} <= dropped
    assert all(m.byte_identical for m in identical)


def test_corpus_expected_delivery_appends_crlf_only_without_final_newline() -> None:
    no_newline = by_name("21-")
    assert no_newline.expected_delivery == no_newline.raw + b"\r\n"
    plain = by_name("01-")
    assert plain.expected_delivery == plain.raw


def test_corpus_needs_smtputf8_only_for_flagged() -> None:
    assert by_name("05-").needs_smtputf8
    assert not by_name("02-").needs_smtputf8


def test_corpus_header_recipients_flatten_groups() -> None:
    assert by_name("28-").header_recipients == [
        "user@example.org",
        "jane.doe@example.org",
        "dev1@example.org",
        "dev2@example.org",
        "carol@example.org",
        "dave+tag@example.org",
    ]


def test_corpus_load_returns_exact_bytes() -> None:
    path = corpus_dir() / "22-bare-lf-unix.eml"
    assert load(path) == path.read_bytes()
    assert load(str(path)).count(b"\r") == 0


def test_corpus_custom_directory_without_index(tmp_path: Path) -> None:
    (tmp_path / "b.eml").write_bytes(b"Subject: b\r\n\r\nb\r\n")
    (tmp_path / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    (tmp_path / "skip.txt").write_bytes(b"not a message")
    messages = corpus_params(tmp_path)
    assert [m.name for m in messages] == ["a.eml", "b.eml"]
    assert [m.description for m in messages] == ["", ""]
    assert all(m.byte_identical for m in messages)
    assert iter_corpus(str(tmp_path), "*.txt")[0].raw == b"not a message"


def test_corpus_params_empty_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no messages"):
        corpus_params(tmp_path)


def test_corpus_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pass the directory"):
        iter_corpus(tmp_path / "absent")


def test_corpus_module_does_not_import_pytest() -> None:
    source = Path(corpus.__file__).read_text(encoding="utf-8")
    assert not re.search(r"^\s*(import|from)\s+pytest", source, re.MULTILINE)


# -- binary attachments are real files ------------------------------------------------------


def attachment(prefix: str, filename: str) -> bytes:
    parsed = email.message_from_bytes(by_name(prefix).raw, policy=email.policy.default)
    for part in parsed.walk():
        if part.get_filename() == filename:
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            return data
    raise AssertionError(f"{filename} not in {prefix}")


def test_corpus_pdf_is_valid() -> None:
    pdf = attachment("11-", "report.pdf")
    assert pdf.startswith(b"%PDF-1.4\n") and pdf.endswith(b"%%EOF\n")
    startxref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert pdf[startxref:].startswith(b"xref\n")
    entries = re.findall(rb"(\d{10}) 00000 n ", pdf)
    assert len(entries) == 5
    for number, offset in enumerate(entries, 1):
        assert pdf[int(offset) :].startswith(f"{number} 0 obj".encode())


@pytest.mark.parametrize(("prefix", "filename"), [("12-", "chart.png"), ("10-", "logo.png")])
def test_corpus_png_is_valid(prefix: str, filename: str) -> None:
    png = attachment(prefix, filename)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, kinds = 8, []
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        kinds.append(kind)
        position += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_corpus_png_corruption_is_detected() -> None:
    png = bytearray(attachment("12-", "chart.png"))
    png[40] ^= 0xFF  # inside IDAT
    (length,) = struct.unpack(">I", png[33:37])
    kind, data = bytes(png[37:41]), bytes(png[41 : 41 + length])
    (crc,) = struct.unpack(">I", png[41 + length : 45 + length])
    assert zlib.crc32(kind + data) & 0xFFFFFFFF != crc


# -- generated messages ---------------------------------------------------------------------


def test_large_message_10mb_has_the_right_size_and_parses() -> None:
    size = 10 * 1024 * 1024
    raw = large_message(size, sender="user@example.com", recipient="user@example.org")
    assert BARE_LF.search(raw) is None and BARE_CR.search(raw) is None
    assert raw.endswith(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 76
    # base64 grows 3 -> 4, plus CRLF per 76 characters, plus well under 1 KB of headers.
    encoded = (size + 2) // 3 * 4
    assert encoded + encoded // 76 * 2 < len(raw) < encoded + encoded // 76 * 2 + 1024
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert [a.addr_spec for a in parsed["To"].addresses] == ["user@example.org"]
    parts = list(parsed.iter_attachments())
    assert len(parts) == 1
    data = parts[0].get_payload(decode=True)
    assert isinstance(data, bytes)
    assert len(data) == size
    assert data == large_payload(size)
    assert base64.b64encode(data[:57]) in raw


def test_large_message_is_deterministic_and_size_specific() -> None:
    assert large_message(1000) == large_message(1000)
    assert large_message(1000) != large_message(1001)
    assert large_payload(1000) != large_payload(1001)[:1000]  # seeded by size


def test_large_message_rejects_negative_size() -> None:
    with pytest.raises(ValueError, match="size must be >= 0"):
        large_message(-1)


def test_large_message_zero_size_parses() -> None:
    parsed = email.message_from_bytes(large_message(0), policy=email.policy.default)
    (part,) = parsed.iter_attachments()
    assert part.get_payload(decode=True) == b""


def test_nested_message_has_requested_depth() -> None:
    parsed = email.message_from_bytes(nested_message(20), policy=email.policy.default)
    depth = 0
    part: Message = parsed
    while part.is_multipart():
        children = part.get_payload()
        assert isinstance(children, list) and len(children) == 1
        assert isinstance(children[0], Message)
        part = children[0]
        depth += 1
    assert depth == 20
    assert part.get_payload() == "bottom"


def test_nested_message_rejects_negative_depth() -> None:
    with pytest.raises(ValueError, match="depth must be >= 0"):
        nested_message(-1)
