#!/usr/bin/env python3
"""The MinIO stand-in's front on the S3 port (see tests/standins/README.md).

    front.py --listen PORT --upstream SOCKET|HOST:PORT --data DIR -- weed mini ...

Starts the command after `--` (SeaweedFS, whose S3 gateway listens on
UPSTREAM: a Unix socket, which costs less than TCP, or HOST:PORT), stops it
on SIGTERM/SIGINT and exits with its status. On PORT it answers MinIO's own
paths itself:

    /minio/health/live                       200 while this process runs
    /minio/health/ready, /minio/health/cluster[/read]
                                             200 once SeaweedFS's S3 answers, else 503
    /minio/v2/metrics/cluster, .../node      Prometheus text, MinIO's metric names
    /minio/v2/metrics/bucket, .../resource   valid but empty
    any other /minio/... path                404 (MinIO reserves the name)
    PUT of an object or part that does not fit
                                             507 XMinioStorageFull, as MinIO (no_room); also
                                             when SeaweedFS fails such a write for room

and relays every other request to SeaweedFS byte for byte: the request
line and headers go on as received (Host and the SigV4-signed headers stay
untouched), bodies are streamed as they arrive (Content-Length, chunked, or
up to EOF for responses), 100-continue is relayed, and each client
connection keeps one upstream connection for its keep-alive life. The
metrics use MinIO's v2 names and label values (api="PutObject").

A thread per connection with blocking sockets: bodies move through one
reused buffer with recv_into/sendall, about half the CPU per byte of an
asyncio relay (even on uvloop).

MINIO_PROMETHEUS_AUTH_TYPE=public opens the metrics; otherwise (MinIO's
default, "jwt") they need `Authorization: Bearer <JWT>` as
`mc admin prometheus generate` makes it: HS512 over the root secret key
(AWS_SECRET_ACCESS_KEY here), subject or accessKey the root user.
"""

import argparse
import base64
import collections
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qsl

CHUNK = 1 << 20  # relay buffer: the most read from a socket at once
HEAD_LIMIT = 1 << 20  # longest request/response head accepted (Go's default)
LINE_LIMIT = 64 << 10  # longest chunk-size or trailer line
IDLE_TIMEOUT = 30  # s a client connection may idle between requests (MinIO's default; weed's is 120)
IO_TIMEOUT = 900  # s without a byte, mid-exchange, before a connection is dropped
BODY_GRACE = 60  # s to finish relaying a request body the upstream already answered
HEALTH_PATHS = ("/minio/health/ready", "/minio/health/cluster", "/minio/health/cluster/read")
EMPTY_METRICS = ("/minio/v2/metrics/bucket", "/minio/v2/metrics/resource")
NO_BODY_STATUS = (204, 304)
# MinIO's constants (cmd/globals.go) and its XMinioStorageFull message.
DISK_FILL_FRACTION = 0.99
DISK_ASSUME_UNKNOWN_SIZE = 1 << 30
STORAGE_FULL = "Storage backend has reached its minimum free drive threshold. Please delete a few objects to proceed."

START = time.time()


class BadRequest(Exception):
    pass


class SendError(Exception):
    """Writing to the other side failed (as opposed to reading from this side)."""


# --------------------------------------------------------------------------- counters


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()
        self.errors = collections.Counter()
        self.errors_4xx = collections.Counter()
        self.errors_5xx = collections.Counter()
        self.canceled = collections.Counter()
        self.inflight = collections.Counter()
        self.invalid = 0
        self.received = 0
        self.sent = 0

    def start(self, api):
        with self.lock:
            if api is None:
                self.invalid += 1
            else:
                self.requests[api] += 1
                self.inflight[api] += 1

    def finish(self, api, status, canceled, received, sent):
        """status 0: no response reached the client."""
        with self.lock:
            self.received += received
            self.sent += sent
            if api is None:
                return
            self.inflight[api] -= 1
            if canceled:
                self.canceled[api] += 1
            if status >= 400:
                self.errors[api] += 1
                (self.errors_4xx if status < 500 else self.errors_5xx)[api] += 1

    def snapshot(self):
        with self.lock:
            return {name: (value.copy() if isinstance(value, collections.Counter) else value)
                    for name, value in vars(self).items() if name != "lock"}


STATS = Stats()


# ------------------------------------------------------------------- S3 API names

# MinIO's handler names (cmd/api-router.go), which its metrics use as `api`.
BUCKET_SUBRESOURCES = {
    "GET": [("uploads", "ListMultipartUploads"), ("versions", "ListObjectVersions"),
            ("location", "GetBucketLocation"), ("policy", "GetBucketPolicy"),
            ("lifecycle", "GetBucketLifecycle"), ("encryption", "GetBucketEncryption"),
            ("object-lock", "GetBucketObjectLockConfig"), ("replication", "GetBucketReplicationConfig"),
            ("versioning", "GetBucketVersioning"), ("notification", "GetBucketNotification"),
            ("events", "ListenNotification"), ("acl", "GetBucketACL"), ("cors", "GetBucketCors"),
            ("website", "GetBucketWebsite"), ("accelerate", "GetBucketAccelerate"),
            ("requestPayment", "GetBucketRequestPayment"), ("logging", "GetBucketLogging"),
            ("tagging", "GetBucketTagging"), ("policyStatus", "GetBucketPolicyStatus")],
    "PUT": [("lifecycle", "PutBucketLifecycle"), ("replication", "PutBucketReplicationConfig"),
            ("encryption", "PutBucketEncryption"), ("policy", "PutBucketPolicy"),
            ("object-lock", "PutBucketObjectLockConfig"), ("tagging", "PutBucketTagging"),
            ("versioning", "PutBucketVersioning"), ("notification", "PutBucketNotification"),
            ("acl", "PutBucketACL"), ("cors", "PutBucketCors")],
    "DELETE": [("policy", "DeleteBucketPolicy"), ("replication", "DeleteBucketReplicationConfig"),
               ("lifecycle", "DeleteBucketLifecycle"), ("encryption", "DeleteBucketEncryption"),
               ("tagging", "DeleteBucketTagging"), ("website", "DeleteBucketWebsite"),
               ("cors", "DeleteBucketCors")],
}
OBJECT_SUBRESOURCES = {
    "GET": [("uploadId", "ListObjectParts"), ("acl", "GetObjectACL"), ("tagging", "GetObjectTagging"),
            ("retention", "GetObjectRetention"), ("legal-hold", "GetObjectLegalHold"),
            ("attributes", "GetObjectAttributes")],
    "PUT": [("acl", "PutObjectACL"), ("tagging", "PutObjectTagging"), ("retention", "PutObjectRetention"),
            ("legal-hold", "PutObjectLegalHold")],
    "POST": [("uploadId", "CompleteMultipartUpload"), ("uploads", "NewMultipartUpload"),
             ("select", "SelectObjectContent"), ("restore", "PostRestoreObject")],
    "DELETE": [("uploadId", "AbortMultipartUpload"), ("tagging", "DeleteObjectTagging")],
}


def api_name(method, path, query, headers):
    """MinIO's name for a path-style S3 request, or None for one MinIO's router rejects."""
    keys = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        if method == "GET":
            return "ListenNotification" if "events" in keys else "ListBuckets"
        return None
    if not key:
        for sub, name in BUCKET_SUBRESOURCES.get(method, ()):
            if sub in keys:
                return name
        if method == "GET":
            if dict(parse_qsl(query, keep_blank_values=True)).get("list-type") == "2":
                return "ListObjectsV2M" if "metadata" in keys else "ListObjectsV2"
            return "ListObjectsV1"
        if method == "POST":
            if "delete" in keys:
                return "DeleteMultipleObjects"
            if headers.get("content-type", "").startswith("multipart/form-data"):
                return "PostPolicyBucket"
            return None
        return {"PUT": "PutBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method)
    if method == "PUT" and "partNumber" in keys and "uploadId" in keys:
        return "CopyObjectPart" if "x-amz-copy-source" in headers else "PutObjectPart"
    for sub, name in OBJECT_SUBRESOURCES.get(method, ()):
        if sub in keys:
            return name
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method)


# ------------------------------------------------------------------ HTTP framing


class Head:
    """A request or response head: its bytes as received and what framing needs."""

    __slots__ = ("raw", "first", "headers", "tokens")

    def __init__(self, raw):
        self.raw = raw
        lines = raw[:-4].split(b"\r\n")
        self.first = lines[0].decode("latin-1")
        self.headers = {}
        self.tokens = set()  # Connection header tokens, lower case
        te = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadRequest(f"malformed header line {line[:80]!r}")
            name = name.decode("latin-1").lower()
            value = value.strip().decode("latin-1")
            if name == "content-length" and name in self.headers and self.headers[name] != value:
                raise BadRequest("conflicting Content-Length headers")
            if name == "transfer-encoding":
                te.append(value)
            elif name == "connection":
                self.tokens.update(t.strip().lower() for t in value.split(","))
            self.headers.setdefault(name, value)
        if te:
            self.headers["transfer-encoding"] = ",".join(te)

    def request_framing(self):
        """("chunked", None) or ("length", n), n possibly 0."""
        te = self.headers.get("transfer-encoding")
        if te is not None:
            if te.split(",")[-1].strip().lower() != "chunked":
                raise BadRequest("unsupported Transfer-Encoding")
            return "chunked", None
        cl = self.headers.get("content-length")
        if cl is None:
            return "length", 0
        if not cl.isdigit():
            raise BadRequest("invalid Content-Length")
        return "length", int(cl)

    def response_framing(self, method, status):
        if method == "HEAD" or status in NO_BODY_STATUS or 100 <= status < 200:
            return "length", 0
        te = self.headers.get("transfer-encoding")
        if te is not None and te.split(",")[-1].strip().lower() == "chunked":
            return "chunked", None
        cl = self.headers.get("content-length")
        if te is None and cl is not None and cl.isdigit():
            return "length", int(cl)
        return "eof", None


class Peer:
    """A blocking socket, what was read from it but not consumed yet, and a relay buffer
    (kept for one exchange: idle connections hold no buffer)."""

    def __init__(self, sock):
        self.sock = sock
        self.pending = bytearray()
        self.buffer = None

    def more(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.pending += data

    def until(self, marker, limit):
        start = 0
        while True:
            i = self.pending.find(marker, start)
            if i >= 0:
                end = i + len(marker)
                data = bytes(self.pending[:end])
                del self.pending[:end]
                return data
            if len(self.pending) > limit:
                raise BadRequest("head or line too long")
            start = max(0, len(self.pending) - len(marker) + 1)
            self.more()

    def read_head(self):
        """The next head (empty lines before it skipped), or None at EOF between messages."""
        while True:
            try:
                raw = self.until(b"\r\n\r\n", HEAD_LIMIT)
            except EOFError:
                if self.pending.strip():
                    raise BadRequest("incomplete head") from None
                return None
            raw = raw.lstrip(b"\r\n")
            if raw:
                return Head(raw)

    def skip(self, n):
        while len(self.pending) < n:
            self.more()
        del self.pending[:n]

    def relay_exact(self, dst, n):
        """Sends the next n bytes to the socket dst; returns n."""
        total = n
        if self.pending:
            k = min(n, len(self.pending))
            send(dst, memoryview(self.pending)[:k])
            del self.pending[:k]
            n -= k
        if n:
            if self.buffer is None:
                self.buffer = bytearray(CHUNK)
            view = memoryview(self.buffer)
            while n:
                k = self.sock.recv_into(view, min(n, CHUNK))
                if not k:
                    raise EOFError
                send(dst, view[:k])
                n -= k
        return total

    def relay_chunked(self, dst):
        """A chunked body, chunk framing and trailers as received; returns its size on the wire."""
        total = 0
        while True:
            line = self.until(b"\r\n", LINE_LIMIT)
            send(dst, line)
            total += len(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("invalid chunk size") from None
            if size == 0:
                while True:  # trailers, up to the empty line
                    line = self.until(b"\r\n", LINE_LIMIT)
                    send(dst, line)
                    total += len(line)
                    if line == b"\r\n":
                        return total
            total += self.relay_exact(dst, size + 2)

    def relay_to_eof(self, dst):
        total = len(self.pending)
        if self.pending:
            send(dst, self.pending)
            self.pending.clear()
        if self.buffer is None:
            self.buffer = bytearray(CHUNK)
        view = memoryview(self.buffer)
        while k := self.sock.recv_into(view):
            send(dst, view[:k])
            total += k
        return total

    def relay_body(self, dst, framing):
        kind, n = framing
        if kind == "chunked":
            return self.relay_chunked(dst)
        if kind == "eof":
            return self.relay_to_eof(dst)
        return self.relay_exact(dst, n) if n else 0


def send(sock, data):
    try:
        sock.sendall(data)
    except OSError as e:
        raise SendError(e) from e


def shut(sock):
    """Ends both directions now, which wakes a thread blocked on the socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def close_gently(sock):
    """FIN after what was sent, then a moment to drain what the client still sends (a body
    nobody read): closing on unread bytes would reset the connection and could lose the
    answer (Go's net/http waits the same way)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        for _ in range(64):
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    sock.close()


def store_full(path):
    """MinIO's answer to a write its drive has no room for; the connection closes after it."""
    s, r, b, t = s3_error(507, "Insufficient Storage", "XMinioStorageFull", STORAGE_FULL, path)
    return response(s, r, b, t, keep=False)


def keeps_alive(head, version):
    return "close" not in head.tokens and (version != "HTTP/1.0" or "keep-alive" in head.tokens)


def response(status, reason, body=b"", ctype="text/plain; charset=utf-8", extra=(), head_only=False, keep=True):
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
             "Server: MinIO", "Vary: Origin", time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
             *extra]
    if not keep:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def s3_error(status, reason, code, message, resource):
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{xml_escape(resource)}</Resource><RequestId></RequestId><HostId></HostId></Error>")
    return status, reason, body.encode(), "application/xml"


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------ the front


class BodyRelay(threading.Thread):
    """Relays a request body from the client to the upstream while the response is awaited."""

    def __init__(self, client, upstream, framing):
        super().__init__(daemon=True)
        self.client, self.upstream, self.framing = client, upstream, framing
        self.received = 0
        self.ok = False
        self.start()

    def run(self):
        try:
            self.received = self.client.relay_body(self.upstream.sock, self.framing)
            self.ok = True
        except SendError:
            pass  # the upstream stopped reading: what it answered is still relayed
        except Exception:  # noqa: BLE001 - the client failed, so the exchange upstream fails too
            shut(self.upstream.sock)


class Front:
    def __init__(self, args):
        self.upstream = args.upstream
        self.data = args.data
        self.server_label = f"127.0.0.1:{args.listen}"
        self.public = os.environ.get("MINIO_PROMETHEUS_AUTH_TYPE", "jwt").strip().lower() == "public"
        self.access_key = os.environ.get("AWS_ACCESS_KEY_ID", "")
        self.secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", "")

    def connect_upstream(self, timeout):
        if self.upstream.startswith("/"):
            sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), self.upstream
        else:
            host, _, port = self.upstream.rpartition(":")
            sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (host, int(port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    # -- connections

    def serve(self, csock):
        """One client connection, request after request."""
        client, upstream = Peer(csock), None
        try:
            if csock.family != socket.AF_UNIX:
                csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                csock.settimeout(IDLE_TIMEOUT)
                try:
                    head = client.read_head()
                except (OSError, EOFError):  # idle too long, or reset
                    return
                if head is None:
                    return
                csock.settimeout(IO_TIMEOUT)
                try:
                    method, target, version = head.first.split(" ")
                except ValueError:
                    raise BadRequest("malformed request line") from None
                framing = head.request_framing()
                path, _, query = target.partition("?")
                if path == "/minio" or path.startswith("/minio/"):
                    keep = self.local(client, head, method, path, version, framing)
                else:
                    if upstream is None:
                        try:
                            upstream = Peer(self.connect_upstream(IO_TIMEOUT))
                        except OSError:
                            # As MinIO answers while it starts: a 503 that S3 clients retry.
                            s, r, b, t = s3_error(503, "Service Unavailable", "XMinioServerNotInitialized",
                                                  "Server not initialized yet, please try again.", path)
                            csock.sendall(response(s, r, b, t, extra=("Retry-After: 1",),
                                                   head_only=method == "HEAD", keep=False))
                            return
                    if self.refused_for_room(method, path, head):
                        # MinIO refuses a write that would leave its drive (almost) full, before the body.
                        csock.sendall(store_full(path))
                        return
                    keep = self.proxy(client, upstream, head, method, path, query, version, framing)
                if not keep:
                    return
        except BadRequest as e:
            try:
                csock.sendall(response(400, "Bad Request", f"{e}\n".encode(), keep=False))
            except OSError:
                pass
        except (OSError, EOFError, SendError):
            pass
        except Exception as e:  # noqa: BLE001 - one connection's failure must not end the front
            print(f"front: connection dropped: {e!r}", file=sys.stderr, flush=True)
        finally:
            if upstream is not None:
                upstream.sock.close()
            close_gently(csock)

    def refused_for_room(self, method, path, head):
        """A PUT of an object or a part that MinIO would refuse for room (no_room)."""
        return method == "PUT" and path.strip("/").count("/") >= 1 and self.no_room(head)

    def no_room(self, head):
        """MinIO's rule (cmd/erasure-server-pool.go): an object or part whose size
        (x-amz-decoded-content-length for aws-chunked bodies, else Content-Length,
        1 GiB if unknown) would leave 1% of the drive or less free is refused."""
        size = head.headers.get("x-amz-decoded-content-length") or head.headers.get("content-length")
        size = int(size) if size and size.isdigit() else DISK_ASSUME_UNKNOWN_SIZE
        fs = os.statvfs(self.data)
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        return free < size or free - size <= total * (1 - DISK_FILL_FRACTION)

    def proxy(self, client, upstream, head, method, path, query, version, framing):
        """One exchange relayed to the upstream; True if both connections stay usable."""
        api = api_name(method, path, query, head.headers)
        STATS.start(api)
        status, done, body, received, sent = 0, False, None, 0, 0
        try:
            send(upstream.sock, head.raw)
            received += len(head.raw)
            if framing != ("length", 0):
                body = BodyRelay(client, upstream, framing)
            while True:
                try:
                    rhead = upstream.read_head()
                except BadRequest as e:
                    raise OSError(f"bad upstream response: {e}") from None
                except OSError:
                    rhead = None
                status = int(rhead.first.split(" ", 2)[1]) if rhead is not None else 0
                if (rhead is None or status >= 500) and self.refused_for_room(method, path, head):
                    # SeaweedFS's own files (its metadata log, LevelDB) need room beyond the
                    # object's, so it can run out where MinIO's rule let the write through; or
                    # parts sent at once each passed the rule. MinIO answers a write its drive
                    # had no room for with 507 XMinioStorageFull too (not a 500 or a dropped line).
                    print(f"front: {method} {path}: SeaweedFS answered {status or 'nothing'} with the drive "
                          "full: 507 XMinioStorageFull instead", file=sys.stderr, flush=True)
                    client.sock.sendall(store_full(path))
                    status, done = 507, True
                    return False
                if rhead is None:
                    raise EOFError("upstream closed without a response")
                send(client.sock, rhead.raw)
                sent += len(rhead.raw)
                if status >= 200 or status == 101:
                    break
            if status == 101:  # an upgrade: a plain tunnel both ways from here on
                if body is None:
                    body = BodyRelay(client, upstream, ("eof", None))
                sent += upstream.relay_to_eof(client.sock)
                done = True
                return False
            rframing = rhead.response_framing(method, status)
            sent += upstream.relay_body(client.sock, rframing)
            done = True
            keep = rframing[0] != "eof" and "close" not in rhead.tokens and keeps_alive(head, version)
            if body is not None:
                if keep:
                    # The upstream read the whole body (else it would say close), so this ends soon.
                    body.join(BODY_GRACE)
                keep = keep and body.ok
            return keep
        finally:
            if body is not None:
                if not body.ok:
                    shut(upstream.sock)  # ends a relay still sending (the client's rest is drained on close)
                    body.join(0.5)
                    if body.is_alive():
                        shut(client.sock)  # or still waiting for a body the client holds back
                        body.join(5)
                received += body.received
            client.buffer = upstream.buffer = None
            STATS.finish(api, status, not done, received, sent)

    # -- MinIO's own paths

    def local(self, client, head, method, path, version, framing):
        keep = keeps_alive(head, version)
        if framing != ("length", 0):
            # Nothing here takes a body: skip a small one, else close after answering.
            if framing[0] == "length" and framing[1] <= 65536 and \
                    "100-continue" not in head.headers.get("expect", "").lower():
                client.skip(framing[1])
            else:
                keep = False
        status, reason, body, ctype, extra = self.answer(method, path, head)
        client.sock.sendall(response(status, reason, body, ctype, extra, head_only=method == "HEAD", keep=keep))
        return keep

    def answer(self, method, path, head):
        path = path.rstrip("/") or "/"
        known = path in ("/minio/health/live", "/minio/v2/metrics/cluster", "/minio/v2/metrics/node") \
            or path in HEALTH_PATHS or path in EMPTY_METRICS
        if not known:
            return (*s3_error(404, "Not Found", "NoSuchKey", "The MinIO stand-in does not serve this path.",
                              path), ())
        if method not in ("GET", "HEAD"):
            return 405, "Method Not Allowed", b"", "text/plain", ("Allow: GET, HEAD",)
        if path == "/minio/health/live":
            return 200, "OK", b"", "text/plain", ()
        if path in HEALTH_PATHS:
            if self.upstream_ready():
                return 200, "OK", b"", "text/plain", ()
            return 503, "Service Unavailable", b"", "text/plain", ()
        if not self.public and not self.authorized(head.headers.get("authorization", "")):
            body = json.dumps({"Code": "AccessDenied", "Message": "Access Denied.", "Resource": path,
                               "RequestId": "", "HostId": ""}).encode()
            return 403, "Forbidden", body, "application/json", ()
        text = "" if path in EMPTY_METRICS else self.metrics(node_only=path == "/minio/v2/metrics/node")
        return 200, "OK", text.encode(), "text/plain; version=0.0.4; charset=utf-8", ()

    def upstream_ready(self):
        """SeaweedFS's S3 gateway answers its /healthz (on a connection of its own, not counted)."""
        try:
            with self.connect_upstream(3) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                return sock.recv(64).split(b" ")[1:2] == [b"200"]
        except OSError:
            return False

    def authorized(self, header):
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self.secret_key:
            return False
        try:
            h64, c64, s64 = token.strip().split(".")
            def b64(s):
                return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
            alg = json.loads(b64(h64)).get("alg")
            digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
            want = hmac.new(self.secret_key.encode(), f"{h64}.{c64}".encode(), digest).digest()
            if not hmac.compare_digest(want, b64(s64)):
                return False
            claims = json.loads(b64(c64))
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(claims, dict):
            return False
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp < time.time():
            return False
        return (claims.get("accessKey") or claims.get("sub")) == self.access_key

    # -- the exposition

    def metrics(self, node_only):
        out = []
        server = self.server_label

        def family(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            for labels, value in samples:
                labels = {**labels, "server": server}
                text = ",".join(f'{k}="{label_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {number(value)}\n")

        try:
            st = os.statvfs(self.data)
            total = (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize  # as MinIO: without root's reserve
            free = st.f_bavail * st.f_frsize
            inodes, free_inodes = st.f_files, st.f_ffree
            online = 1
        except OSError:
            total = free = inodes = free_inodes = online = 0
        drive = {"drive": self.data}
        if not node_only:
            family("minio_cluster_capacity_raw_total_bytes", "gauge", "Total capacity online in the cluster",
                   [({}, total)])
            family("minio_cluster_capacity_raw_free_bytes", "gauge", "Total free capacity online in the cluster",
                   [({}, free)])
            family("minio_cluster_capacity_usable_total_bytes", "gauge",
                   "Total usable capacity online in the cluster", [({}, total)])
            family("minio_cluster_capacity_usable_free_bytes", "gauge",
                   "Total free usable capacity online in the cluster", [({}, free)])
            family("minio_cluster_drive_online_total", "gauge", "Total drives online in this cluster", [({}, online)])
            family("minio_cluster_drive_offline_total", "gauge", "Total drives offline in this cluster",
                   [({}, 1 - online)])
            family("minio_cluster_drive_total", "gauge", "Total drives in this cluster", [({}, 1)])
            family("minio_cluster_nodes_online_total", "gauge", "Total number of MinIO nodes online", [({}, 1)])
            family("minio_cluster_nodes_offline_total", "gauge", "Total number of MinIO nodes offline", [({}, 0)])
            family("minio_cluster_health_status", "gauge", "Get current cluster health status", [({}, online)])
            family("minio_cluster_write_quorum", "gauge", "Maximum write quorum across all pools and sets",
                   [({}, 1)])
        family("minio_node_drive_total_bytes", "gauge", "Total storage on a drive", [(drive, total)])
        family("minio_node_drive_free_bytes", "gauge", "Total storage available on a drive", [(drive, free)])
        family("minio_node_drive_used_bytes", "gauge", "Total storage used on a drive", [(drive, total - free)])
        family("minio_node_drive_total_inodes", "gauge", "Total inodes on a drive", [(drive, inodes)])
        family("minio_node_drive_free_inodes", "gauge", "Free inodes on a drive", [(drive, free_inodes)])
        family("minio_node_drive_used_inodes", "gauge", "Total inodes used on a drive",
               [(drive, inodes - free_inodes)])
        family("minio_node_drive_online_total", "gauge", "Total drives online in this node", [({}, online)])
        family("minio_node_drive_offline_total", "gauge", "Total drives offline in this node", [({}, 1 - online)])
        family("minio_node_drive_total", "gauge", "Total drives in this node", [({}, 1)])

        stats = STATS.snapshot()

        def per_api(counter):
            return [({"api": api}, counter[api]) for api in sorted(counter)]

        family("minio_s3_requests_total", "counter", "Total number of S3 requests in the current MinIO server "
               "instance", per_api(stats["requests"]))
        family("minio_s3_requests_errors_total", "counter", "Total number of S3 requests with (4xx and 5xx) errors "
               "in the current MinIO server instance", per_api(stats["errors"]))
        family("minio_s3_requests_4xx_errors_total", "counter", "Total number of S3 requests with (4xx) errors "
               "in the current MinIO server instance", per_api(stats["errors_4xx"]))
        family("minio_s3_requests_5xx_errors_total", "counter", "Total number of S3 requests with (5xx) errors "
               "in the current MinIO server instance", per_api(stats["errors_5xx"]))
        family("minio_s3_requests_canceled_total", "counter", "Total number of S3 requests that were canceled "
               "by the client", per_api(stats["canceled"]))
        family("minio_s3_requests_inflight_total", "gauge", "Total number of S3 requests currently in flight",
               per_api(stats["inflight"]))
        family("minio_s3_requests_waiting_total", "gauge", "Total number of S3 requests in the waiting queue",
               [({}, 0)])
        family("minio_s3_requests_rejected_invalid_total", "counter", "Total number S3 invalid requests",
               [({}, stats["invalid"])])
        family("minio_s3_traffic_received_bytes", "counter", "Total number of s3 bytes received",
               [({}, stats["received"])])
        family("minio_s3_traffic_sent_bytes", "counter", "Total number of s3 bytes sent", [({}, stats["sent"])])
        family("minio_node_process_starttime_seconds", "gauge", "Start time for MinIO process per node, time in "
               "seconds since Unix epoc", [({}, START)])
        family("minio_node_process_uptime_seconds", "gauge", "Uptime for MinIO process per node in seconds",
               [({}, time.time() - START)])
        family("minio_software_version_info", "gauge", "MinIO Release tag for the server",
               [({"version": "stand-in (SeaweedFS)"}, 1)])
        return "".join(out)


def label_escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value):
    return str(value) if isinstance(value, int) else repr(float(value))


# ---------------------------------------------------------------------------- main


def listener(port):
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    except OSError:  # no IPv6 here
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1024)
    return sock


def accept_forever(front, server):
    while True:
        try:
            csock, _ = server.accept()
            threading.Thread(target=front.serve, args=(csock,), daemon=True).start()
        except (OSError, RuntimeError) as e:  # out of descriptors or threads: wait a moment
            print(f"front: accept: {e!r}", file=sys.stderr, flush=True)
            time.sleep(0.1)


def main(argv):
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: front.py --listen PORT --upstream SOCKET|HOST:PORT --data DIR -- COMMAND...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--data", required=True)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]

    threading.stack_size(512 << 10)  # a thread per connection: keep them small
    front = Front(args)
    server = listener(args.listen)
    proc = subprocess.Popen(command)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.poll() is None and proc.send_signal(signum))
    threading.Thread(target=accept_forever, args=(front, server), daemon=True).start()
    code = proc.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
