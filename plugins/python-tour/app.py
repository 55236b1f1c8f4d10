"""Tour of the task world in Python: a file read, an HTTP GET and a shell call.

Input: `{"file": PATH, "url": URL, "command": CMD}`, each key optional.
Output: `{"language": "python", "file_bytes": N, "http_status": N,
"command_stdout": TEXT}`. A step whose key is absent or null gives null, and
a step that fails gives its error text in place of the value. Input that is
neither a JSON object nor null fails the run.
"""

# componentize-py 0.25.1 snapshots the interpreter after importing this
# module, and the component contains only the modules loaded by then: a
# standard library module first imported inside a function fails at run time
# with ModuleNotFoundError. Keep every import at the top.
import json
import re
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import wit_world
from componentize_py_types import Err
from wit_world.imports import outgoing_handler, shell, streams
from wit_world.imports.wasi_http_types import (
    Fields,
    IncomingBody,
    IncomingResponse,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
    http_error_code,
)

# Bytes asked for per read of the response body.
READ_SIZE = 64 * 1024


class WitWorld(wit_world.WitWorld):
    def run(self, input: str) -> str:
        try:
            request = json.loads(input)
        except json.JSONDecodeError as e:
            raise Err(f"invalid input: {e}; expected a JSON object such as {{\"file\": PATH}}")
        # A run without input passes `null`.
        if request is None:
            request = {}
        if not isinstance(request, dict):
            raise Err(f"invalid input: expected a JSON object, got {type(request).__name__}")

        output = {
            "language": "python",
            "file_bytes": run_step(request, "file", read_file_size),
            "http_status": run_step(request, "url", fetch_status),
            "command_stdout": run_step(request, "command", run_command),
        }
        return json.dumps(output)


def run_step(request: dict, key: str, step: Callable[[str], Any]) -> Any:
    """Run `step` on `request[key]`, returning None when the key is absent or
    null and the error text when the step fails."""
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        return f"invalid {key}: expected a string, got {type(value).__name__}"
    try:
        return step(value)
    except StepError as e:
        return str(e)
    except OSError as e:
        return f"{key} step failed: {e}"


class StepError(Exception):
    """A step failure whose message is the text reported for that step."""


def read_file_size(path: str) -> int:
    """Read the whole file through the WASI preopened directories."""
    with open(path, "rb") as f:
        return len(f.read())


def fetch_status(url: str) -> int:
    """Send a GET through wasi:http/outgoing-handler and drain the body."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise StepError(f"invalid url {url!r}: {e}")
    if parts.scheme == "http":
        scheme = Scheme_Http()
    elif parts.scheme == "https":
        scheme = Scheme_Https()
    else:
        raise StepError(f"invalid url {url!r}: the scheme must be http or https")
    if not parts.netloc:
        raise StepError(f"invalid url {url!r}: the host is missing")
    path_with_query = parts.path or "/"
    if parts.query:
        path_with_query += "?" + parts.query

    # The method defaults to GET.
    request = OutgoingRequest(Fields())
    try:
        request.set_scheme(scheme)
        request.set_authority(parts.netloc)
        request.set_path_with_query(path_with_query)
    except Err:
        raise StepError(f"invalid url {url!r}: the host rejected its scheme, authority or path")

    try:
        future = outgoing_handler.handle(request, None)
    except Err as e:
        raise StepError(f"HTTP request failed: {describe_error_code(e.value)}")

    with future:
        with future.subscribe() as pollable:
            pollable.block()
        result = future.get()

    # `get` returns option<result<result<incoming-response, error-code>>>;
    # the outer error only means the value was already taken.
    if result is None or isinstance(result, Err):
        raise StepError("HTTP request failed: the response was not available")
    if isinstance(result.value, Err):
        raise StepError(f"HTTP request failed: {describe_error_code(result.value.value)}")

    with result.value.value as response:
        status = response.status()
        try:
            drain_body(response)
        except StepError as e:
            raise StepError(f"{e} (after status {status})")
    return status


def drain_body(response: IncomingResponse) -> None:
    """Read the response body to its end, so the host finishes the exchange."""
    body = response.consume()
    try:
        with body.stream() as stream:
            read_to_end(stream)
    except BaseException:
        body.__exit__(None, None, None)
        raise
    # The stream, a child of the body, is dropped above. `finish` consumes
    # the body, and the trailers it returns are not needed.
    with IncomingBody.finish(body):
        pass


def read_to_end(stream: streams.InputStream) -> None:
    while True:
        try:
            stream.blocking_read(READ_SIZE)
        except Err as e:
            if isinstance(e.value, streams.StreamError_Closed):
                return
            raise StepError(f"HTTP response body failed: {describe_stream_error(e.value.value)}")


def describe_stream_error(error: Any) -> str:
    """Format a wasi:io error from a body stream, as an HTTP error code when
    the host gives one."""
    code = http_error_code(error)
    if code is not None:
        return describe_error_code(code)
    # The debug string is free-form host text; its first line is the message.
    # The host may append more, such as a Rust backtrace.
    lines = error.to_debug_string().splitlines()
    return lines[0] if lines else "unknown stream error"


def describe_error_code(code: Any) -> str:
    """Format a wasi:http error-code as its WIT case name, plus any payload."""
    case = type(code).__name__.removeprefix("ErrorCode_")
    # `HttpRequestDenied` -> `http-request-denied`, close to the WIT spelling.
    name = re.sub(r"(?<!^)(?=[A-Z])", "-", case).lower()
    payload: Optional[Any] = getattr(code, "value", None)
    return name if payload is None else f"{name}: {payload}"


def run_command(command: str) -> str:
    """Run `command` through apex:task/shell and return its stdout as text."""
    try:
        output = shell.run(command, shell.Options(cwd=None, stdin=None))
    except Err as e:
        error = e.value
        if isinstance(error, shell.Error_Denied):
            raise StepError(f"shell call denied: {error.value}")
        if isinstance(error, shell.Error_TimedOut):
            raise StepError(f"shell call timed out: {error.value}")
        raise StepError(f"shell call failed: {error.value}")
    return output.stdout.decode("utf-8", errors="replace")
