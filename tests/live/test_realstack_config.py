"""The Postfix + Dovecot harness's configuration text (benchmarks/_realstack_config.py).

Pure functions, so these run everywhere, unlike the rest of tests/live which needs root and
the packages: each knob changes exactly the lines it is for, and its absence leaves them out.
"""

from __future__ import annotations

from benchmarks._realstack_config import (
    ALTERED_SUFFIX,
    DUPLICATE_DETAIL,
    dovecot_conf,
    postfix_main_cf,
    postfix_maps,
    postfix_master_cf,
)

WORKDIR = "/tmp/rt-mail-abcdefgh"
ETC = f"{WORKDIR}/postfix/etc"
PORTS = {
    "submissions": 10001,
    "submission": 10002,
    "imaps": 10003,
    "imap": 10004,
    "pop3s": 10005,
    "pop3": 10006,
    "smtp": 10007,
}
USERS = ["alice@example.net", "bob@example.net"]


def _maps(**knobs: bool) -> tuple[dict[str, str], list[str]]:
    flags = {"discard_mail": False, "duplicate_delivery": False, "alter_body": False, **knobs}
    return postfix_maps(etc=ETC, domain="example.net", users=USERS, **flags)


def _master(*, mx: bool = False, plaintext: bool = False) -> str:
    return postfix_master_cf(
        workdir=WORKDIR,
        host="127.0.0.2",
        ports=PORTS,
        mx=mx,
        allow_plaintext_auth_on_starttls_port=plaintext,
    )


def _listeners(master: str) -> list[str]:
    return [line.split()[0] for line in master.splitlines() if " inet " in line]


def test_realstack_config_healthy_server_has_only_the_mailbox_map() -> None:
    maps, extra = _maps()
    assert maps == {"vmailbox": "alice@example.net OK\nbob@example.net OK\n"}
    assert extra == []


def test_realstack_config_each_broken_knob_adds_its_map() -> None:
    maps, extra = _maps(discard_mail=True, duplicate_delivery=True, alter_body=True)
    assert maps["transport"].startswith("example.net discard:")
    assert f"alice@example.net alice+{DUPLICATE_DETAIL}@example.net" in maps["virtual"].replace(
        ", ", " "
    )
    assert ALTERED_SUFFIX in maps["body_checks"]
    assert f"transport_maps = texthash:{ETC}/transport" in extra
    assert f"body_checks = regexp:{ETC}/body_checks" in extra


def test_realstack_config_submission_listeners_bind_the_host_only() -> None:
    assert _listeners(_master()) == ["127.0.0.2:10001", "127.0.0.2:10002"]


def test_realstack_config_mx_knob_adds_the_mx_listener() -> None:
    assert _listeners(_master(mx=True)) == ["127.0.0.2:10001", "127.0.0.2:10002", "127.0.0.2:10007"]


def test_realstack_config_starttls_port_requires_tls_by_default() -> None:
    master = _master()
    assert "smtpd_tls_security_level=encrypt" in master.split("127.0.0.2:10002")[1]
    assert "smtpd_tls_auth_only=yes" in master


def test_realstack_config_plaintext_knob_allows_auth_before_starttls() -> None:
    master = _master(plaintext=True)
    assert "smtpd_tls_security_level=may" in master.split("127.0.0.2:10002")[1]
    assert "smtpd_tls_auth_only=no" in master


def test_realstack_config_postfix_sends_nothing_off_the_machine() -> None:
    main = postfix_main_cf(
        workdir=WORKDIR,
        etc=ETC,
        hostname="mail.example.net",
        domain="example.net",
        host="127.0.0.1",
        extra=["body_checks = regexp:x"],
    )
    for transport in ("default_transport", "relay_transport", "local_transport"):
        assert f"\n{transport} = error:" in main
    assert f"virtual_transport = lmtp:unix:{WORKDIR}/sock/lmtp" in main
    assert main.endswith("\nbody_checks = regexp:x\n")


def test_realstack_config_dovecot_requires_tls_and_listens_on_every_port() -> None:
    conf = dovecot_conf(
        workdir=WORKDIR, host="127.0.0.1", domain="example.net", ports=PORTS, uid=65534, gid=65534
    )
    assert "\nssl = required\n" in conf
    assert "\nlisten = 127.0.0.1\n" in conf
    for name in ("imap", "imaps", "pop3", "pop3s"):
        assert f"port = {PORTS[name]}\n" in conf
    assert f"home={WORKDIR}/mail/%d/%n" in conf
    settings = [line for line in conf.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line]
