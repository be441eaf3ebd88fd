#!/usr/bin/env python3
"""A real SMTP server for autopay's tests, built on aiosmtpd.

It listens on 127.0.0.1 only. With `--port 0` (the default) the system picks a free port;
either way the server prints `READY <port>` on stdout, and nothing else, once it is listening.
Logs go to stderr. SIGTERM (or SIGINT) stops it cleanly.

    --cert PEM --key PEM     offer STARTTLS with this certificate and key
    --require-starttls       refuse everything but EHLO/NOOP/QUIT before STARTTLS
    --tls-wrapper            speak implicit TLS from the first byte instead (needs --cert/--key)
    --user U --password P    require AUTH (PLAIN or LOGIN) before MAIL; anything else gets 535
    --maildir DIR            write each accepted message as DIR/<n>.eml (the raw bytes received)
                             and DIR/<n>.json (mail_from, rcpt_tos, tls, authenticated, ...)

Scripted replies at RCPT, chosen by the local part of the recipient:

    tempfail-N[+tag]@...  451 4.3.0 for the first N attempts at that exact address (counted
                          across connections, and across restarts when --maildir is given),
                          then accepted
    reject[+tag]@...      550 5.1.1 mailbox unavailable
    relaydenied[+tag]@... 554 5.7.1 relay access denied
    policy[+tag]@...      550 5.7.1 recipient does not accept mail from this sender

At the end of DATA, for a message to such a recipient (accepted at RCPT):

    spam[+tag]@...        554 5.7.1 message rejected as spam

At MAIL FROM, chosen by the local part of the sender:

    refusedsender[+tag]@...  553 5.7.1 sender address not permitted

Every other sender, recipient and message is accepted.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import ssl
import sys
import warnings

try:
    from aiosmtpd.controller import UnthreadedController
    from aiosmtpd.smtp import AuthResult, LoginPassword
except ImportError as error:  # pragma: no cover - the harness turns this into the fix
    print(
        f"aiosmtpd is not installed ({error}): run "
        f"`{sys.executable} -m pip install 'aiosmtpd>=1.4'`",
        file=sys.stderr,
    )
    sys.exit(3)

TEMPFAIL = re.compile(r"^tempfail-(\d+)(\+.*)?$", re.IGNORECASE)
REJECT = re.compile(r"^reject(\+.*)?$", re.IGNORECASE)
RELAYDENIED = re.compile(r"^relaydenied(\+.*)?$", re.IGNORECASE)
POLICY = re.compile(r"^policy(\+.*)?$", re.IGNORECASE)
SPAM = re.compile(r"^spam(\+.*)?$", re.IGNORECASE)
REFUSEDSENDER = re.compile(r"^refusedsender(\+.*)?$", re.IGNORECASE)

COUNTS_FILE = ".tempfail-counts.json"


def write_atomically(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Handler:
    def __init__(self, maildir):
        self.maildir = maildir
        self.attempts = {}
        self.next_number = 1
        if maildir:
            os.makedirs(maildir, exist_ok=True)
            numbers = [
                int(name[: -len(".eml")])
                for name in os.listdir(maildir)
                if name.endswith(".eml") and name[: -len(".eml")].isdigit()
            ]
            self.next_number = max(numbers, default=0) + 1
            counts = os.path.join(maildir, COUNTS_FILE)
            if os.path.exists(counts):
                with open(counts, encoding="utf-8") as f:
                    self.attempts = json.load(f)

    def _save_attempts(self):
        if self.maildir:
            data = json.dumps(self.attempts, indent=1).encode()
            write_atomically(os.path.join(self.maildir, COUNTS_FILE), data)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if REFUSEDSENDER.match(address.rsplit("@", 1)[0]):
            return "553 5.7.1 sender address not permitted"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.rsplit("@", 1)[0]
        tempfail = TEMPFAIL.match(local)
        if tempfail:
            failures = int(tempfail.group(1))
            seen = self.attempts.get(address, 0)
            self.attempts[address] = seen + 1
            self._save_attempts()
            if seen < failures:
                return "451 4.3.0 try again later"
        elif REJECT.match(local):
            return "550 5.1.1 mailbox unavailable"
        elif RELAYDENIED.match(local):
            return "554 5.7.1 relay access denied"
        elif POLICY.match(local):
            return "550 5.7.1 recipient does not accept mail from this sender"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(SPAM.match(rcpt.rsplit("@", 1)[0]) for rcpt in envelope.rcpt_tos):
            return "554 5.7.1 message rejected as spam"
        number = self.next_number
        self.next_number += 1
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        login = getattr(session.auth_data, "login", None)
        if isinstance(login, bytes):
            login = login.decode("utf-8", errors="replace")
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "tls": tls,
            "authenticated": bool(session.authenticated),
            "login": login,
            "helo": session.host_name,
            "peer": list(session.peer) if session.peer else None,
        }
        if self.maildir:
            base = os.path.join(self.maildir, str(number))
            write_atomically(base + ".eml", envelope.original_content or b"")
            write_atomically(base + ".json", json.dumps(meta, indent=1).encode())
        return f"250 2.0.0 OK queued as {number}"


class Authenticator:
    """Accepts exactly one user name and password, by PLAIN or LOGIN."""

    def __init__(self, user, password):
        self.user = user.encode()
        self.password = password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user
            and auth_data.password == self.password
        )
        # handled=False: let aiosmtpd send its own reply (235, or 535 5.7.8).
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--tls-wrapper", action="store_true")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--maildir")
    args = p.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    if (args.tls_wrapper or args.require_starttls) and not args.cert:
        p.error("--tls-wrapper and --require-starttls need --cert and --key")
    if args.tls_wrapper and args.require_starttls:
        p.error("--tls-wrapper and --require-starttls exclude each other")
    if (args.user is None) != (args.password is None):
        p.error("--user and --password go together")
    return args


def main(argv):
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="smtp-peer %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Requiring AUTH without STARTTLS is what we want when the test asks for it, and aiosmtpd
    # itself sets the deprecated login_data: neither is worth a line in the log.
    warnings.simplefilter("ignore")
    logging.getLogger("mail.log").addFilter(
        lambda record: not any(
            noise in record.getMessage()
            for noise in ("auth_require_tls == False", "login_data is deprecated")
        )
    )

    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    smtp_kwargs = {
        "server_hostname": "localhost",
        "ident": "autopay test SMTP peer",
    }
    ssl_context = None
    if args.tls_wrapper:
        ssl_context = context
    elif context is not None:
        smtp_kwargs["tls_context"] = context
        smtp_kwargs["require_starttls"] = args.require_starttls
    if args.user is not None:
        smtp_kwargs["authenticator"] = Authenticator(args.user, args.password)
        smtp_kwargs["auth_required"] = True
        # With STARTTLS on offer, AUTH waits for it, as real servers do. Implicit TLS is
        # encrypted already, and without any TLS the test asked for plain AUTH.
        smtp_kwargs["auth_require_tls"] = context is not None and not args.tls_wrapper
    else:
        smtp_kwargs["auth_require_tls"] = False

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    controller = UnthreadedController(
        Handler(args.maildir),
        hostname="127.0.0.1",
        port=args.port,
        loop=loop,
        ssl_context=ssl_context,
        **smtp_kwargs,
    )
    try:
        controller.begin()
    except OSError as error:
        print(f"cannot listen on 127.0.0.1:{args.port}: {error}", file=sys.stderr)
        return 2
    port = controller.server.sockets[0].getsockname()[1]

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    print(f"READY {port}", flush=True)
    try:
        loop.run_forever()
    finally:
        controller.end()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
