"""--backend triton: the fields go to a Triton Inference Server (KServe v2 over HTTP or gRPC); decoding and
preprocessing stay here. The server's model is one that describes itself (runtime/model/served.py): served by
`python -m runtime.triton_server` or from a repository `python -m export triton` wrote. Before the first field its
metadata and parameters are read and checked against the local model where one is named (a mismatch is refused,
naming what differs), else its manifest is taken as the contract. A server that is down, slow or full (HTTP 503,
gRPC UNAVAILABLE) is retried with a doubling back-off up to --triton-retries times, within --triton-timeout per
try; then that batch's images get the error (the scheduler's rule), every other image its result. An answer is
checked before it is used: each output of shape (n,) or (n, 1) for n fields, every probability finite and within
[0, 1], else that batch's images get the error. Triton's inference API has no authentication of its own: headers
for a gateway in front of it come from --triton-header / --triton-header-file, and their values never appear in a
message (only their names); credentials in the URL (``https://user:pass@host:port``) are sent as HTTP Basic
authentication and stripped from the URL that results and messages name; --triton-ca trusts a private CA for
https:// and grpcs://."""
from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from runtime.backends.base import Backend, BackendUnavailable
from runtime.model.manifest import Manifest, ModelError
from runtime.model.model_dir import recheck_band
from runtime.model.precisions import PRECISIONS
from runtime.model.served import DEFAULT_NAME, Served, served_name

SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}
AUTO_ORDER = (*(p.name for p in PRECISIONS.values() if p.auto), "fp32")  # --precision auto: the first served
RETRYABLE = ("503", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: what a header's name may be


class TritonUnavailable(BackendUnavailable):
    """The Triton server cannot be used: not reachable, no such model, or it stayed busy past the retries."""


@dataclass(frozen=True)
class TritonTarget:
    """Where the fields go: --triton-url, --triton-model, --triton-header(-file), --triton-timeout, --triton-retries,
    --triton-ca. Its repr shows neither header values nor the URL's password."""

    url: str
    model: str | None = None  # None: DEFAULT_NAME's model of the precision asked for (auto: the first served)
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 60.0
    retries: int = 4
    ca: str | None = None  # a CA certificate file (PEM) trusted for https:// and grpcs:// instead of the system's

    def __post_init__(self) -> None:
        for name, value in self.headers:
            check_header(name, value)

    def __repr__(self) -> str:
        return (f"TritonTarget({without_credentials(self.url)!r}, model={self.model!r}, headers="
                f"{[name for name, _ in self.headers]}, timeout_s={self.timeout_s}, retries={self.retries}, "
                f"ca={self.ca!r})")


class HeaderError(ValueError):
    """A header that cannot be sent; the message names the header, never its value."""


def check_header(name: str, value: str) -> None:
    """Refuse (HeaderError naming ``name`` only) a header whose name is not an HTTP token or whose value holds a line
    break or other control character (it would end the header and start another)."""
    if not HEADER_NAME.fullmatch(name):
        raise HeaderError(f"header {name[:40]!r}: not a valid header name (letters, digits and !#$%&'*+.^_`|~-)")
    if not value.strip() or any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        raise HeaderError(f"header {name}: its value is empty or holds a line break or control character")


def parse_headers(lines: list[str], where: str) -> tuple[tuple[str, str], ...]:
    """``Name: value`` lines (blank lines and # comments skipped) as (name, value) pairs; HeaderError naming
    ``where`` and the line (its number and the header's name, never the value) for one that is not."""
    headers = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise HeaderError(f"{where}:{n}: not a 'Name: value' line (no ':')")
        try:
            check_header(name.strip(), value.strip())
        except HeaderError as e:
            raise HeaderError(f"{where}:{n}: {e}") from None
        headers.append((name.strip(), value.strip()))
    return tuple(headers)


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part: what results, /v1/model and messages name."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class Connection:
    """tritonclient's client, HTTP or gRPC, behind the few calls the backend makes: one per thread that calls (the
    HTTP client runs on gevent, whose connections belong to the thread that made them; the server's worker thread
    classifies for the thread that opened the model)."""

    def __init__(self, target: TritonTarget) -> None:
        self.url, self.timeout = without_credentials(target.url), target.timeout_s
        parts = urlsplit(target.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in SCHEMES or not parts.hostname or not port:
            raise TritonUnavailable(f"--triton-url {self.url!r}: give http://HOST:PORT, https://HOST:PORT, "
                                    "grpc://HOST:PORT or grpcs://HOST:PORT")
        self.protocol, tls = SCHEMES[parts.scheme]
        if target.ca and not tls:
            raise TritonUnavailable(f"--triton-ca is for https:// and grpcs:// URLs, not {self.url}")
        # gRPC metadata keys are lower case (HTTP/2); HTTP/1.1 keeps the names as given
        self.headers = {k.lower() if self.protocol == "grpc" else k: v for k, v in target.headers}
        self.secrets = list(self.headers.values())
        if parts.username is not None or parts.password is not None:  # sent as Basic authentication, never shown
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            if not any(k.lower() == "authorization" for k in self.headers):
                self.headers["authorization" if self.protocol == "grpc" else "Authorization"] = "Basic " + basic
            self.secrets += [s for s in (password, parts.password, basic) if s]
        try:
            if self.protocol == "http":
                import tritonclient.http as client
            else:
                import tritonclient.grpc as client  # type: ignore[no-redef]
        except ImportError as e:
            raise TritonUnavailable(f"the Triton client is not installed ({e}): pip install -e '.[triton]'") from None
        self.module = client
        netloc = parts.netloc.rpartition("@")[2]
        options: dict[str, Any]
        if self.protocol == "http":
            options = {"connection_timeout": self.timeout, "network_timeout": self.timeout}
            if target.ca:  # geventhttpclient's context: certificate and host name checked, against this CA only
                options["ssl_options"] = {"ca_certs": target.ca}
        else:
            options = {"root_certificates": target.ca} if target.ca else {}
        self._make = lambda: client.InferenceServerClient(netloc, ssl=tls, **options)
        self._local = threading.local()
        self._clients: list[Any] = []

    @property
    def client(self) -> Any:
        """This thread's client, made on its first call."""
        made = getattr(self._local, "client", None)
        if made is None:
            made = self._local.client = self._make()
            self._clients.append(made)
        return made

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``; a connection failure or a Triton error becomes TritonUnavailable naming the server."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (tritonclient raises InferenceServerException, OSError, gevent/grpc types)
            # not chained: the message is the one with secrets replaced
            raise TritonUnavailable(f"Triton at {self.url}: {what}: {self.describe(e)}") from None

    def describe(self, e: BaseException) -> str:
        """``describe(e)`` with every header value and URL credential replaced by ``***`` (a server or a library
        that echoes a request's headers must not put a secret into a result)."""
        text = describe(e)
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def ready(self, model: str) -> bool:
        return bool(self.call("readiness", lambda: self.client.is_model_ready(model, headers=self.headers)))

    def config(self, model: str) -> dict[str, Any]:
        if self.protocol == "http":
            return self.call("model config", lambda: self.client.get_model_config(model, headers=self.headers))
        return self.call("model config", lambda: self.client.get_model_config(model, headers=self.headers,
                                                                                as_json=True))["config"]

    def metadata(self, model: str) -> dict[str, Any]:
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        return self.call("model metadata", lambda: self.client.get_model_metadata(model, headers=self.headers, **kw))

    def infer(self, model: str, name: str, fields: np.ndarray, outputs: tuple[str, ...]) -> tuple[dict, str]:
        """(outputs, the version that answered); raises tritonclient's own errors (the caller retries)."""
        x = self.module.InferInput(name, list(fields.shape), "FP32")
        x.set_data_from_numpy(fields)
        wanted = [self.module.InferRequestedOutput(o) for o in outputs]
        if self.protocol == "http":
            r = self.client.infer(model, [x], outputs=wanted, headers=self.headers)
            version = r.get_response()["model_version"]
        else:
            r = self.client.infer(model, [x], outputs=wanted, headers=self.headers, client_timeout=self.timeout)
            version = r.get_response(as_json=True)["model_version"]
        return {o: answered(o, r.as_numpy(o), len(fields)) for o in outputs}, str(version)

    def close(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # a gevent client closed from another thread than its own: dropped with the process
                pass
        self._clients.clear()


class BadAnswer(ValueError):
    """The server answered with something that is not n probabilities: never retried, never used."""


def answered(name: str, value: Any, n: int) -> np.ndarray:
    """Output ``name`` of an answer for ``n`` fields as n float32 values; BadAnswer where it is missing, not numeric,
    not of shape (n,) or (n, 1) (an (n, 2) answer is not cut to n values, a short one not padded), or, for the
    probability, not finite and within [0, 1]."""
    if value is None:
        raise BadAnswer(f"the answer has no output {name!r}")
    got = np.asarray(value)
    if got.dtype.kind not in "fiu":
        raise BadAnswer(f"output {name!r} is {got.dtype}, not numbers")
    if got.shape not in ((n,), (n, 1)):
        raise BadAnswer(f"output {name!r} has shape {got.shape} for {n} fields: expected ({n},) or ({n}, 1)")
    got = got.astype(np.float32).reshape(n)
    if name == "probability" and not np.all((got >= 0) & (got <= 1)):  # NaN fails both comparisons
        bad = got[~((got >= 0) & (got <= 1))]
        raise BadAnswer(f"output {name!r} holds {bad.size} value(s) that are not probabilities in [0, 1] "
                        f"(e.g. {bad[0]})")
    return got


def _status(e: BaseException) -> str | None:
    """tritonclient's status of an error ("503", "StatusCode.UNAVAILABLE"), None for other errors."""
    return e.status() if hasattr(e, "status") and callable(e.status) else None


def describe(e: BaseException) -> str:
    status = _status(e)
    text = (e.message() if hasattr(e, "message") and callable(e.message) else None) or str(e) or type(e).__name__
    return f"{text.splitlines()[0][:300]}" + (f" ({status})" if status and status not in text else "")


def retryable(e: BaseException) -> bool:
    """A server that is full or not (yet) there: worth another try after a pause; anything else is final."""
    status = _status(e)
    return status in RETRYABLE or isinstance(e, (ConnectionError, TimeoutError)) or (
        status is None and "timed out" in str(e).lower())


class TritonBackend:
    """A Backend whose run() is an inference request to ``model`` on the server of ``conn``."""

    device_input = False
    on_gpu = False  # what runs here is decoding and preprocessing: the host's cores are theirs

    def __init__(self, conn: Connection, target: TritonTarget, model: str, local: Manifest | None) -> None:
        self.conn, self.target, self.model = conn, target, model
        where = f"Triton at {conn.url}, model {model}"
        if not conn.ready(model):
            raise TritonUnavailable(f"{where}: not ready (not in its repository, or still loading)")
        config, meta = conn.config(model), conn.metadata(model)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        served = Served.from_parameters(params, where)
        if local is not None:
            diffs = served.differences(local) + band_differences(served, local)
            if diffs:
                raise ModelError(f"{where} is not the local model {local.name}: " + "; ".join(diffs))
        if served.precision != "fp32" and not served.band > 0:  # NaN included: 0 would turn its re-checks off
            raise ModelError(f"{where}: serves {served.precision} with a re-check band of {served.band!r}: every "
                             f"{served.precision} label would go without FP32's re-check; serve it from a model "
                             "directory whose gate recorded its band (python -m export triton, python -m "
                             "runtime.triton_server)")
        inputs = {i["name"]: [int(d) for d in i["shape"]] for i in meta.get("inputs", [])}
        if config.get("max_batch_size", 0) and len(next(iter(inputs.values()), [])) == 4:
            inputs = {k: [-1, *v] for k, v in inputs.items()}  # a repository's config states dims without the batch
        served.manifest.check_model(where, inputs, [o["name"] for o in meta.get("outputs", [])], None)
        self.served, self.manifest = served, served.manifest
        self.version = str(max(meta.get("versions") or ["1"], key=lambda v: int(v) if v.isdigit() else 0))
        self.precision, self.band = served.precision, served.band
        self.name = f"triton-{served.precision} ({model} v{self.version} at {conn.url})"
        self.model_file, self.file_sha256 = served.model_file, served.file_sha256
        max_batch = int(config.get("max_batch_size") or 1)
        self.max_batch = max_batch
        self.preferred_batch = min(8, max_batch)  # one request per batch: the server batches across clients too

    def run(self, fields: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs for ``fields``, retried while the server is full or unreachable; TritonUnavailable after the
        last try, naming the server, the model and what it said."""
        fields = np.ascontiguousarray(fields, np.float32)
        outputs = tuple(self.manifest.output_names)
        delay, tries = 0.25, self.target.retries + 1
        for attempt in range(1, tries + 1):
            try:
                got, version = self.conn.infer(self.model, self.manifest.input_name, fields, outputs)
            except Exception as e:  # tritonclient's, gevent's and grpc's own types
                if attempt == tries or not retryable(e):
                    raise TritonUnavailable(f"Triton at {self.conn.url}, model {self.model}: "
                                            f"{self.conn.describe(e)}"
                                            f"{f' (after {attempt} tries)' if attempt > 1 else ''}") from None
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            if version != self.version:  # a new version was loaded meanwhile: not the model that was checked
                raise TritonUnavailable(f"Triton at {self.conn.url}, model {self.model}: answered with version "
                                        f"{version}, not the version {self.version} checked at start")
            return got
        raise AssertionError("unreachable")

    def reference(self) -> tuple[Callable[[], Backend], str]:
        """(how to open, what it is): the FP32 model on the same server that re-checks this precision's in-band
        fields, checked to be the same model at FP32; refused now (not at the first in-band field) where the server
        names none."""
        model = self.served.recheck_model
        if not model:
            raise TritonUnavailable(f"Triton at {self.conn.url}, model {self.model}: {self.precision} with no FP32 "
                                    "model named for its re-checks (breakhis_recheck_model): serve one, or give up the "
                                    "re-checks with --recheck off")

        def open_reference() -> Backend:
            ref = TritonBackend(Connection(self.target), self.target, model, self.manifest)
            if ref.precision != "fp32":
                raise TritonUnavailable(f"Triton at {self.conn.url}: {model}, named for re-checks, runs "
                                        f"{ref.precision}")
            return ref

        return open_reference, f"{model} on the same Triton server (opened at start by a service, else on first need)"

    def close(self) -> None:
        self.conn.close()


def band_differences(served: Served, local: Manifest) -> list[str]:
    """The re-check band the server declares against the local manifest's for that precision (the local gate's
    figure is the one that counts: a server's band taken on trust could turn re-checks down or off)."""
    if served.precision not in local.variants:
        return [(f"precision {served.precision}: not a variant of the local model, whose gates give no re-check "
                 f"band for it (it has {', '.join(sorted(local.variants))})")]
    band = recheck_band(local, served.precision)[0]
    return [] if served.band == band else [f"re-check band: server {served.band!r}, local {band!r}"]


def open_triton(target: TritonTarget, precision: str, local: Manifest | None) -> tuple[TritonBackend, list[str]]:
    """(backend, notes): ``target.model``, else the precision's model (auto: the first of AUTO_ORDER the server has
    ready); ModelError where the server's model is not the local one."""
    conn = Connection(target)
    try:
        if not conn.call("liveness", lambda: conn.client.is_server_live(headers=conn.headers)):
            raise TritonUnavailable(f"Triton at {conn.url}: not live")
        if target.model is not None:
            return TritonBackend(conn, target, target.model, local), []
        wanted = AUTO_ORDER if precision == "auto" else (precision,)
        for p in wanted:
            name = served_name(DEFAULT_NAME, p)
            if conn.ready(name):
                notes = [f"precision auto chose {p}: the first of {', '.join(AUTO_ORDER)} this server has ready"] \
                    if precision == "auto" else []
                return TritonBackend(conn, target, name, local), notes
        names = " or ".join(served_name(DEFAULT_NAME, p) for p in wanted)
        raise TritonUnavailable(f"Triton at {conn.url}: no model {names} ready (name another with --triton-model)")
    except BaseException:
        conn.close()
        raise
