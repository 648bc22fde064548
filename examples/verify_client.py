"""Calling VerifyToken from your service, in Python with grpcio.

The client side the README's section "Calling VerifyToken from your service"
recommends; the integration tests run it against the real server.

    python -m grpc_tools.protoc -I proto --python_out=stubs --grpc_python_out=stubs \
        proto/identity/v1/*.proto
    PYTHONPATH=stubs IDENTITY_ADDR=127.0.0.1:50051 VERIFIER_TOKEN=idpat_... \
        python examples/verify_client.py project:read

It reads one presented credential per line on stdin and prints the HTTP
status your service would answer and why, as examples/verify_client.rs does:
`200 <username>`, `401 <reason>`, `403 <reason>`, `503 <code>`, `500 <code>`.

What it does, and why:
- One channel for the process. grpcio's default reconnect back-off starts at
  1 s and grows to 120 s, and a call on a channel in back-off fails at once
  with UNAVAILABLE: after the identity service restarts, such a client keeps
  failing for seconds. So: a short back-off (100 ms to 2 s), and
  `wait_for_ready=True` with a deadline, so a call made while reconnecting
  waits for the connection (up to its deadline) instead of failing at once.
- A deadline on every call (300 ms), keepalive pings, one retry on
  UNAVAILABLE only (the call never reached a working server; never retry
  DEADLINE_EXCEEDED, which may have spent a use of a limited-use token).
- Fail closed: an outage is 503. The verifier's own credential failing
  (UNAUTHENTICATED, PERMISSION_DENIED) is a configuration error: 500.
"""

import json
import os
import sys

import grpc

from identity.v1 import tokens_pb2, tokens_pb2_grpc

# Every verification's deadline, unless VERIFY_DEADLINE_MS says otherwise.
DEADLINE_SECONDS = float(os.environ.get("VERIFY_DEADLINE_MS", "300")) / 1000

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 1),
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [
                            {
                                "service": "identity.v1.TokensService",
                                "method": "VerifyToken",
                            }
                        ],
                        "retryPolicy": {
                            "maxAttempts": 2,
                            "initialBackoff": "0.05s",
                            "maxBackoff": "0.05s",
                            "backoffMultiplier": 1,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        ),
    ),
]


class Verifier:
    """One channel and the service's own verifier credential."""

    def __init__(self, addr, verifier_token):
        self._channel = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
        self._stub = tokens_pb2_grpc.TokensServiceStub(self._channel)
        self._metadata = (("authorization", "Bearer " + verifier_token),)

    def decide(self, presented, scopes):
        """(HTTP status, detail) for a credential one of your clients sent."""
        request = tokens_pb2.VerifyTokenRequest(
            token=presented,
            required_scopes=scopes,
            # Your own client's address, for the token's last_used_address.
            client_address="",
        )
        try:
            verdict = self._stub.VerifyToken(
                request,
                timeout=DEADLINE_SECONDS,
                metadata=self._metadata,
                wait_for_ready=True,
            )
        except grpc.RpcError as error:
            code = error.code()
            if code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ):
                return 503, code.name
            return 500, code.name
        if verdict.active:
            return 200, verdict.principal.username
        reason = tokens_pb2.InactiveReason.Name(verdict.reason)
        if verdict.reason == tokens_pb2.INACTIVE_REASON_INSUFFICIENT_SCOPE:
            return 403, reason
        return 401, reason


def main():
    addr = os.environ.get("IDENTITY_ADDR", "127.0.0.1:50051")
    token = os.environ.get("VERIFIER_TOKEN")
    if not token:
        sys.exit("set VERIFIER_TOKEN to a tokens:verify token")
    verifier = Verifier(addr, token)
    for line in sys.stdin:
        status, detail = verifier.decide(line.strip(), sys.argv[1:])
        print(status, detail, flush=True)


if __name__ == "__main__":
    main()
