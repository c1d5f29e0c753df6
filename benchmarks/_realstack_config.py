"""Configuration text for the loopback Postfix + Dovecot of ``benchmarks/_realstack.py``.

Each function returns the text of one file from the harness's settings; ``RealMailServer``
writes them under its temporary directory and starts the daemons on them. The files name
every path, address and port themselves, so nothing is read from ``/etc/postfix`` or
``/etc/dovecot``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "ALTERED_SUFFIX",
    "DUPLICATE_DETAIL",
    "dovecot_conf",
    "postfix_main_cf",
    "postfix_maps",
    "postfix_master_cf",
]

#: The marker that ``alter_body=True`` appends to every non-empty body line.
ALTERED_SUFFIX = " [altered by relay]"
#: The address detail (``user+DETAIL@domain``) used by ``duplicate_delivery=True``.
DUPLICATE_DETAIL = "roundtrip-duplicate"

#: master.cf entries after the smtpd listeners: the daemons Postfix needs, none chrooted.
MASTER_SERVICES = """\
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
lmtp       unix  - - n -    - lmtp
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def dovecot_conf(
    *, workdir: str, host: str, domain: str, ports: Mapping[str, int], uid: int, gid: int
) -> str:
    """dovecot.conf: IMAP, POP3 and LMTP on ``host``, TLS required, mail owned by ``uid``."""
    main = _dovecot_main(workdir=workdir, host=host, domain=domain, uid=uid, gid=gid)
    return main + _dovecot_logins(host=host, ports=ports)


def _dovecot_main(*, workdir: str, host: str, domain: str, uid: int, gid: int) -> str:
    """Everything but the login listeners: paths, TLS, auth, storage, LMTP."""
    w = workdir
    return f"""\
# Written by the roundtrip test harness; nothing here is read from /etc/dovecot.
instance_name = roundtrip-{os.path.basename(w)}
base_dir = {w}/run
state_dir = {w}/dovecot/state
listen = {host}
protocols = imap pop3 lmtp
log_path = {w}/log/dovecot.log
default_login_user = dovenull
default_internal_user = dovecot
# TLS before any authentication, even from loopback (Dovecot treats loopback as secure).
ssl = required
ssl_cert = <{w}/tls/cert.pem
ssl_key = <{w}/tls/key.pem
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
# Tests try wrong passwords on purpose; the default 2 s penalty only slows them down.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {w}/dovecot/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={w}/mail/%d/%n
}}
protocol lmtp {{
  postmaster_address = postmaster@{domain}
}}
service lmtp {{
  unix_listener {w}/sock/lmtp {{
    mode = 0666
  }}
}}
# Without this socket Dovecot skips its per-IP penalty (2 s, doubling after each failure),
# which would otherwise slow every wrong-password test that follows another.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {w}/sock/auth-client {{
    mode = 0666
  }}
}}
"""


def _dovecot_logins(*, host: str, ports: Mapping[str, int]) -> str:
    """The IMAP and POP3 login services, each with a STARTTLS and an implicit-TLS port."""
    p = ports
    return f"""\
service imap-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener imap {{
    address = {host}
    port = {p["imap"]}
  }}
  inet_listener imaps {{
    address = {host}
    port = {p["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener pop3 {{
    address = {host}
    port = {p["pop3"]}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {p["pop3s"]}
    ssl = yes
  }}
}}
"""


def postfix_maps(
    *,
    etc: str,
    domain: str,
    users: Iterable[str],
    discard_mail: bool,
    duplicate_delivery: bool,
    alter_body: bool,
    relays: Mapping[str, tuple[str, int]] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The lookup tables (file name under ``etc`` -> text) and the main.cf lines using them.

    ``relays`` maps a foreign domain to the ``(host, port)`` its mail goes to over SMTP (the
    ``smtp`` transport; the ``[]`` turn off MX look-ups, postconf(5) ``transport_maps``).
    """
    maps = {
        "vmailbox": "".join(f"{user} OK\n" for user in users),
    }
    extra: list[str] = []
    transport = ""
    if discard_mail:
        transport += f"{domain} discard:silently dropped by roundtrip harness\n"
    for foreign, (relay_host, relay_port) in (relays or {}).items():
        transport += f"{foreign} smtp:[{relay_host}]:{relay_port}\n"
    if transport:
        maps["transport"] = transport
        extra.append(f"transport_maps = texthash:{etc}/transport")
    if duplicate_delivery:
        # The alias maps each user to itself plus user+detail; Dovecot strips the detail,
        # so both copies land in the same INBOX, in separate LMTP transactions.
        maps["virtual"] = "".join(
            f"{user} {user}, {user.replace('@', '+' + DUPLICATE_DETAIL + '@', 1)}\n"
            for user in users
        )
        extra.append(f"virtual_alias_maps = texthash:{etc}/virtual")
        extra.append("lmtp_destination_recipient_limit = 1")
    if alter_body:
        maps["body_checks"] = f"/^(.*[^[:space:]].*)$/ REPLACE ${{1}}{ALTERED_SUFFIX}\n"
        extra.append(f"body_checks = regexp:{etc}/body_checks")
    return maps, extra


def postfix_main_cf(
    *, workdir: str, etc: str, hostname: str, domain: str, host: str, extra: Sequence[str]
) -> str:
    """main.cf: own directories, loopback only, no outbound mail, virtual mailboxes via LMTP."""
    w = workdir
    return f"""\
# Written by the roundtrip test harness; nothing here is read from /etc/postfix.
compatibility_level = 3.6
queue_directory = {w}/postfix/spool
data_directory = {w}/postfix/data
mail_owner = postfix
setgid_group = postdrop
default_privs = nobody
myhostname = {hostname}
mydomain = {domain}
myorigin = $mydomain
mydestination =
mynetworks = 127.0.0.0/8
# Every listener names its address in master.cf; these only tell Postfix which addresses
# are its own ("127.0.0.2" is no interface address, but the kernel routes it to lo).
inet_interfaces = loopback-only
proxy_interfaces = {host}
inet_protocols = ipv4
maillog_file = {w}/log/postfix.log
maillog_file_prefixes = {w}/log
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = yes
# Nothing leaves this machine.
default_transport = error:outbound mail is disabled in the roundtrip harness
relay_transport = error:outbound mail is disabled in the roundtrip harness
local_transport = error:local delivery is disabled in the roundtrip harness
virtual_mailbox_domains = {domain}
virtual_mailbox_maps = texthash:{etc}/vmailbox
virtual_transport = lmtp:unix:{w}/sock/lmtp
smtpd_banner = $myhostname ESMTP
smtpd_tls_chain_files = {w}/tls/key.pem, {w}/tls/cert.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_sasl_type = dovecot
smtpd_sasl_path = {w}/sock/auth-client
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions =
smtp_tls_security_level = none
tls_random_source = dev:/dev/urandom
delay_warning_time = 0
notify_classes =
in_flow_delay = 0
smtpd_error_sleep_time = 0
{chr(10).join(extra)}
"""


def postfix_master_cf(
    *,
    workdir: str,
    host: str,
    ports: Mapping[str, int],
    mx: bool,
    allow_plaintext_auth_on_starttls_port: bool,
) -> str:
    """master.cf: the smtpd listeners (submission ports, optional MX), then the services."""
    w = workdir
    submission_tls = "may" if allow_plaintext_auth_on_starttls_port else "encrypt"
    submission_auth_only = "no" if allow_plaintext_auth_on_starttls_port else "yes"
    submit_opts = (
        "  -o smtpd_sasl_auth_enable=yes\n"
        "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
    )
    p = ports
    master = f"""\
# Written by the roundtrip test harness. Nothing is chrooted: the sockets live in {w}/sock.
{host}:{p["submissions"]} inet n - n - - smtpd
  -o syslog_name=postfix/submissions
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
{submit_opts}\
{host}:{p["submission"]} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level={submission_tls}
  -o smtpd_tls_auth_only={submission_auth_only}
{submit_opts}\
"""
    if mx:
        master += (
            f"{host}:{p['smtp']} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/mx\n"
            "  -o smtpd_relay_restrictions=reject_unauth_destination\n"
        )
    return master + MASTER_SERVICES
