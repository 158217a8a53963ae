"""
Local stand-ins for the FCM HTTP v1 API, Google's OAuth2 token endpoint and Twilio's
Messages API, plus an aiosmtpd sink, and a uvicorn-in-a-thread server helper.

Each stand-in checks every request exactly as the provider documents it and records
any deviation in ``problems`` (tests assert it stays empty); it answers with the
provider's real success and error shapes, and canned answers can be queued with
``script``. ``python -m tests.handlers.channels.standins`` runs them all in their own
process for the benchmark and prints their addresses as one JSON line.
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")


@dataclass(frozen=True)
class Canned:
    """One queued answer: status, JSON body and extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def fcm_error(status: int, grpc_status: str, message: str, error_code: str = "") -> Canned:
    """An FCM v1 error body exactly as Google sends it (google.rpc.Status + FcmError)."""
    details = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}] if error_code else []
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = details
    return Canned(status, {"error": error})


def twilio_error(status: int, code: int, message: str) -> Canned:
    """A Twilio REST error body: ``{code, message, more_info, status}``."""
    return Canned(
        status,
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
    )


async def _form(request: Request) -> dict[str, str]:
    """
    Parse an ``application/x-www-form-urlencoded`` body strictly.

    Parsed here rather than with ``request.form()`` so a repeated field is caught
    (providers take the first or reject it) and python-multipart is not needed.
    """
    pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True)
    form = dict(pairs)
    if len(form) != len(pairs):
        raise ValueError(f"repeated form fields in {[k for k, _ in pairs]}")
    return form


def _respond(canned: Canned) -> Response:
    return JSONResponse(canned.body, status_code=canned.status, headers=canned.headers)


# --------------------------------------------------------------------------- FCM


@dataclass
class FcmStandIn:
    """
    Google's token endpoint (``POST /token``) and FCM ``messages:send``.

    Token exchange checks: form-encoded body with exactly ``grant_type`` (the JWT
    bearer URN) and ``assertion``; the assertion is an RS256 JWT whose signature
    verifies with ``public_key``, whose header names ``kid``, and whose claims are
    ``iss`` = ``client_email``, ``scope`` = the FCM scope, ``aud`` = this endpoint's
    URL, integer ``iat`` not in the future and ``exp`` = ``iat`` + 3600.

    Send checks: path project, ``Authorization: Bearer`` with a token this stand-in
    issued and that has not expired by ``now()``, JSON content type, and a body of
    ``{"message": {"token", "notification": {"title", "body"}, "data": {str: str}}}``.
    """

    public_key: bytes
    client_email: str
    project_id: str
    private_key_id: str
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    expires_in: int = 3600
    record: bool = True
    problems: list[str] = field(default_factory=list)
    exchanges: int = 0
    tokens: dict[str, datetime] = field(default_factory=dict)
    sends: list[dict[str, Any]] = field(default_factory=list)
    send_count: int = 0
    unauthenticated: int = 0
    dead_tokens: set[str] = field(default_factory=set)
    script: deque[Canned] = field(default_factory=deque)
    token_script: deque[Canned] = field(default_factory=deque)

    def reset(self, now: Callable[[], datetime]) -> None:
        """Forget everything; used between tests sharing one server."""
        self.now = now
        self.expires_in = 3600
        self.problems.clear()
        self.exchanges = 0
        self.tokens.clear()
        self.sends.clear()
        self.send_count = 0
        self.unauthenticated = 0
        self.dead_tokens.clear()
        self.script.clear()
        self.token_script.clear()

    def revoke_all(self) -> None:
        """Make every issued access token invalid (the API then answers 401)."""
        self.tokens.clear()

    def routes(self) -> list[Route]:
        return [
            Route("/token", self._token, methods=["POST"]),
            Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
        ]

    def _problem(self, text: str) -> None:
        self.problems.append(text)

    async def _token(self, request: Request) -> Response:
        self.exchanges += 1
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            self._problem(f"token: content-type {request.headers.get('content-type')!r}")
        try:
            form = await _form(request)
        except ValueError as exc:
            self._problem(f"token: {exc}")
            return self._oauth_error("invalid_request", str(exc))
        if sorted(form) != ["assertion", "grant_type"]:
            self._problem(f"token: form fields {sorted(form.keys())}")
        if form.get("grant_type") != JWT_BEARER:
            self._problem(f"token: grant_type {form.get('grant_type')!r}")
            return self._oauth_error("unsupported_grant_type", "Invalid grant_type")
        problem = self._check_assertion(form.get("assertion", ""), str(request.url))
        if problem:
            self._problem(f"token: {problem}")
            return self._oauth_error("invalid_grant", problem)
        if self.token_script:
            return _respond(self.token_script.popleft())
        token = "ya29.standin-" + secrets.token_urlsafe(24)
        self.tokens[token] = self.now() + timedelta(seconds=self.expires_in)
        return JSONResponse(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    def _check_assertion(self, assertion: str, audience: str) -> str:
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=audience,
                # Time claims are checked below against the stand-in's clock, which
                # tests move by hand; PyJWT only knows the real clock.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "require": ["iss", "scope", "aud", "iat", "exp"],
                },
            )
        except jwt.PyJWTError as exc:
            return f"assertion rejected: {exc!r}"
        if header.get("alg") != "RS256" or header.get("typ") != "JWT":
            return f"assertion header {header}"
        if header.get("kid") != self.private_key_id:
            return f"assertion kid {header.get('kid')!r}"
        if claims["iss"] != self.client_email:
            return f"iss {claims['iss']!r}"
        if claims["scope"] != FCM_SCOPE:
            return f"scope {claims['scope']!r}"
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat != 3600:
            return f"iat/exp {iat!r}/{exp!r}: exp must be iat + 3600"
        now = int(self.now().timestamp())
        if iat > now + 60 or exp <= now:
            return f"iat {iat} / exp {exp} do not bracket now {now}"
        return ""

    @staticmethod
    def _oauth_error(error: str, description: str) -> Response:
        return JSONResponse({"error": error, "error_description": description}, status_code=400)

    async def _send(self, request: Request) -> Response:
        self.send_count += 1
        if request.path_params["project"] != self.project_id:
            self._problem(f"send: project {request.path_params['project']!r}")
            return _respond(fcm_error(404, "NOT_FOUND", "Requested entity was not found."))
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        expiry = self.tokens.get(token)
        if scheme != "Bearer" or expiry is None or expiry <= self.now():
            self.unauthenticated += 1
            return _respond(
                fcm_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 "
                    "access token, login cookie or other valid authentication credential.",
                )
            )
        if not request.headers.get("content-type", "").startswith("application/json"):
            self._problem(f"send: content-type {request.headers.get('content-type')!r}")
        try:
            body = json.loads(await request.body())
        except ValueError:
            self._problem("send: body is not JSON")
            return _respond(fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
        problem = self._check_message(body)
        if problem:
            self._problem(f"send: {problem}")
            return _respond(fcm_error(400, "INVALID_ARGUMENT", problem, "INVALID_ARGUMENT"))
        if self.record:
            self.sends.append(body)
        device = body["message"]["token"]
        if device in self.dead_tokens:
            return _respond(
                fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
            )
        if self.script:
            return _respond(self.script.popleft())
        return JSONResponse(
            {"name": f"projects/{self.project_id}/messages/0:{time.time_ns()}%31bd1c9631bd1c96"}
        )

    @staticmethod
    def _check_message(body: Any) -> str:
        if not isinstance(body, dict) or set(body) != {"message"}:
            return f"top-level keys {sorted(body) if isinstance(body, dict) else body!r}"
        message = body["message"]
        if not isinstance(message, dict) or set(message) != {"token", "notification", "data"}:
            return f"message keys {sorted(message) if isinstance(message, dict) else message!r}"
        if not isinstance(message["token"], str) or not message["token"]:
            return "message.token must be a non-empty string"
        notification = message["notification"]
        if not isinstance(notification, dict) or set(notification) != {"title", "body"}:
            return f"message.notification {notification!r}"
        if not all(isinstance(v, str) for v in notification.values()):
            return "message.notification values must be strings"
        data = message["data"]
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            return "message.data must map strings to strings"
        # Reserved words (FCM docs, Message.data): "from", "message_type", "google*", "gcm*".
        reserved = [
            k for k in data if k in {"from", "message_type"} or k.startswith(("google", "gcm"))
        ]
        if reserved:
            return f"message.data uses reserved keys {reserved}"
        # FCM's 4096-byte limit is on the payload (notification + data), in UTF-8.
        payload = {"notification": notification, "data": data}
        if len(json.dumps(payload, ensure_ascii=False).encode()) > 4096:
            return "message is larger than 4096 bytes"
        return ""


# --------------------------------------------------------------------------- Twilio


@dataclass
class TwilioStandIn:
    """
    Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``.

    Checks: the path's account SID, HTTP basic auth (SID, auth token), form encoding,
    ``To`` in E.164, exactly one of ``From`` / ``MessagingServiceSid``, a non-empty
    ``Body`` of at most 1600 characters, no other fields. Answers 201 with a Message
    resource, or Twilio's error JSON.
    """

    account_sid: str
    auth_token: str
    record: bool = True
    problems: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    send_count: int = 0
    unsubscribed: set[str] = field(default_factory=set)
    script: deque[Canned] = field(default_factory=deque)

    def reset(self) -> None:
        """Forget everything; used between tests sharing one server."""
        self.problems.clear()
        self.messages.clear()
        self.send_count = 0
        self.unsubscribed.clear()
        self.script.clear()

    def routes(self) -> list[Route]:
        return [Route("/2010-04-01/Accounts/{sid}/Messages.json", self._create, methods=["POST"])]

    def _authorized(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme != "Basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == self.account_sid and password == self.auth_token

    async def _create(self, request: Request) -> Response:
        self.send_count += 1
        if not self._authorized(request):
            return _respond(twilio_error(401, 20003, "Authenticate"))
        if request.path_params["sid"] != self.account_sid:
            self._problem(f"path account {request.path_params['sid']!r}")
            return _respond(twilio_error(404, 20404, "The requested resource was not found"))
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            self._problem(f"content-type {request.headers.get('content-type')!r}")
        try:
            form = await _form(request)
        except ValueError as exc:
            self._problem(str(exc))
            return _respond(twilio_error(400, 21603, str(exc)))
        senders = {"From", "MessagingServiceSid"} & set(form)
        if len(senders) != 1 or not set(form) <= {"To", "Body", "From", "MessagingServiceSid"}:
            self._problem(f"form fields {sorted(form)}")
            return _respond(
                twilio_error(
                    400, 21603, "The source 'From' phone number is required to send an SMS"
                )
            )
        body = form.get("Body", "")
        if not body:
            self._problem("empty Body")
            return _respond(twilio_error(400, 21602, "Message body is required."))
        if len(body) > 1600:
            self._problem(f"Body of {len(body)} characters")
            return _respond(
                twilio_error(
                    400, 21617, "The concatenated message body exceeds the 1600 character limit."
                )
            )
        to = form.get("To", "")
        if not _E164.fullmatch(to):
            return _respond(
                twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
            )
        if to in self.unsubscribed:
            return _respond(twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"))
        if self.script:
            return _respond(self.script.popleft())
        if self.record:
            self.messages.append(form)
        sid = "SM" + secrets.token_hex(16)
        return JSONResponse(
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": body,
                "status": "queued",
                "direction": "outbound-api",
                "api_version": "2010-04-01",
                "num_segments": "1",
                "error_code": None,
                "error_message": None,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
            status_code=201,
        )

    def _problem(self, text: str) -> None:
        self.problems.append(text)


# --------------------------------------------------------------------------- SMTP


@dataclass
class SmtpSink:
    """
    aiosmtpd handler that keeps what it receives and refuses chosen recipients.

    A recipient whose local part is a key of ``refuse`` gets that reply at ``RCPT``
    (e.g. ``"nouser": "550 5.1.1 ..."``), which is how real servers refuse.
    ``pipelining``: the EHLO offers PIPELINING (RFC 2920), as most submission servers'
    do; aiosmtpd reads its commands a line at a time, so it answers pipelined ones in
    order, but it does not offer the extension of its own accord.
    """

    record: bool = True
    pipelining: bool = False
    envelopes: list[Envelope] = field(default_factory=list)
    count: int = 0
    refuse: dict[str, str] = field(
        default_factory=lambda: {
            "busy": "450 4.2.1 Mailbox busy, try again later",
            "nouser": "550 5.1.1 <nouser>: Recipient address rejected: User unknown",
            "policy": "550 5.7.1 Message rejected as spam",
        }
    )

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a handler with this hook
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the last line, "250 HELP"
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.refuse.get(address.partition("@")[0])
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        if self.record:
            self.envelopes.append(envelope)
        return "250 2.0.0 Message accepted for delivery"


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A TCP port that was free a moment ago (for servers that cannot take a socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose ``proto``
    # says TCP (``base_events._set_nodelay``), and accepted sockets inherit the
    # listener's proto. With ``socket.socket()`` (proto 0) every response would sit
    # in Nagle's buffer for the peer's 40 ms delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def app_for(*standins: FcmStandIn | TwilioStandIn) -> Starlette:
    """One Starlette app serving every given stand-in's routes."""
    return Starlette(routes=list(itertools.chain.from_iterable(s.routes() for s in standins)))


@contextlib.contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    """
    Run ``app`` under uvicorn in a daemon thread on a free port; yield its base URL.

    The socket is bound here and handed to uvicorn, so there is no port race; exit
    stops the server, joins the thread and closes the socket.
    """
    sock = _bound_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --------------------------------------------------------------------------- bench process


def main(argv: list[str] | None = None) -> None:
    """Serve FCM, Twilio and SMTP stand-ins in this process until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--public-key", type=Path, required=True)
    parser.add_argument("--client-email", required=True)
    parser.add_argument("--project-id", required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    fcm = FcmStandIn(
        public_key=args.public_key.read_bytes(),
        client_email=args.client_email,
        project_id=args.project_id,
        private_key_id=args.key_id,
        record=False,
    )
    twilio = TwilioStandIn(args.account_sid, args.auth_token, record=False)
    asyncio.run(
        _serve_until_stdin_closes(
            app_for(fcm, twilio), fcm, twilio, SmtpSink(record=False, pipelining=True)
        )
    )


async def _serve_until_stdin_closes(
    app: Starlette, fcm: FcmStandIn, twilio: TwilioStandIn, sink: SmtpSink
) -> None:
    # SMTP runs on this same event loop rather than in aiosmtpd's Controller thread: two
    # busy threads would hand the GIL back and forth every switch interval (5 ms) and
    # the benchmark would measure that instead of our channels.
    smtp = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, hostname="127.0.0.1"), "127.0.0.1", 0
    )
    smtp_port = smtp.sockets[0].getsockname()[1]
    sock = _bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    print(json.dumps({"http": url, "smtp_port": smtp_port}), flush=True)  # noqa: T201
    await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin to stop us
    server.should_exit = True
    await task
    sock.close()
    smtp.close()
    await smtp.wait_closed()
    print(  # noqa: T201
        json.dumps(
            {
                "fcm_sends": fcm.send_count,
                "fcm_exchanges": fcm.exchanges,
                "sms_sends": twilio.send_count,
                "emails": sink.count,
                "problems": fcm.problems + twilio.problems,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
