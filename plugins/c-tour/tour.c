// The tour in C: reads a file through the WASI filesystem, makes a GET
// through wasi:http/outgoing-handler and runs a command through the host's
// apex:task/shell, then reports the three results as JSON.
//
// Input: {"file": PATH, "url": URL, "command": CMD}, each key optional.
// Output: {"language": "c", "file_bytes": N, "http_status": N,
// "command_stdout": TEXT}. A failed step gives its error text in place of the
// value, and an absent key gives null.

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "json.h"
#include "task.h"

// Formats a message into a malloc'd string.
static char *format_message(const char *format, ...) {
  va_list args;
  va_start(args, format);
  int size = vsnprintf(NULL, 0, format, args);
  va_end(args);

  char *message = malloc((size_t)size + 1);
  if (message == NULL) abort();
  va_start(args, format);
  vsnprintf(message, (size_t)size + 1, format, args);
  va_end(args);
  return message;
}

// Appends `message` as a JSON string and frees it.
static void append_error(json_buffer_t *out, char *message) {
  json_append_string(out, message, strlen(message));
  free(message);
}

// --- File --------------------------------------------------------------------

// Counts the bytes of the file at `path`. wasi-libc resolves the path against
// the preopened directories, which the host takes from `paths_allow`.
static void append_file_bytes(json_buffer_t *out, const json_text_t *path) {
  if (memchr(path->data, '\0', path->len) != NULL) {
    append_error(out, format_message("invalid path: it contains a NUL character"));
    return;
  }

  FILE *file = fopen(path->data, "rb");
  if (file == NULL) {
    append_error(out, format_message("cannot open %s: %s", path->data, strerror(errno)));
    return;
  }

  char chunk[16384];
  unsigned long long total = 0;
  size_t read;
  while ((read = fread(chunk, 1, sizeof chunk, file)) > 0) total += read;
  bool read_failed = ferror(file) != 0;
  int read_errno = errno;
  fclose(file);

  if (read_failed) {
    append_error(out, format_message("cannot read %s: %s", path->data, strerror(read_errno)));
    return;
  }
  json_append_u64(out, total);
}

// --- HTTP --------------------------------------------------------------------

// The case names of wasi:http's `error-code` variant, indexed by tag.
static const char *const HTTP_ERROR_NAMES[] = {
    "DNS-timeout",
    "DNS-error",
    "destination-not-found",
    "destination-unavailable",
    "destination-IP-prohibited",
    "destination-IP-unroutable",
    "connection-refused",
    "connection-terminated",
    "connection-timeout",
    "connection-read-timeout",
    "connection-write-timeout",
    "connection-limit-reached",
    "TLS-protocol-error",
    "TLS-certificate-error",
    "TLS-alert-received",
    "HTTP-request-denied",
    "HTTP-request-length-required",
    "HTTP-request-body-size",
    "HTTP-request-method-invalid",
    "HTTP-request-URI-invalid",
    "HTTP-request-URI-too-long",
    "HTTP-request-header-section-size",
    "HTTP-request-header-size",
    "HTTP-request-trailer-section-size",
    "HTTP-request-trailer-size",
    "HTTP-response-incomplete",
    "HTTP-response-header-section-size",
    "HTTP-response-header-size",
    "HTTP-response-body-size",
    "HTTP-response-trailer-section-size",
    "HTTP-response-trailer-size",
    "HTTP-response-transfer-coding",
    "HTTP-response-content-coding",
    "HTTP-response-timeout",
    "HTTP-upgrade-failed",
    "HTTP-protocol-error",
    "loop-detected",
    "configuration-error",
    "internal-error",
};

// Returns a malloc'd description of an error code: its WIT case name, with
// the message that `internal-error` may carry. Frees the error code.
static char *describe_http_error(wasi_http_types_error_code_t *code) {
  size_t count = sizeof HTTP_ERROR_NAMES / sizeof HTTP_ERROR_NAMES[0];
  const char *name = code->tag < count ? HTTP_ERROR_NAMES[code->tag] : "unknown error code";

  char *message;
  if (code->tag == WASI_HTTP_TYPES_ERROR_CODE_INTERNAL_ERROR && code->val.internal_error.is_some) {
    task_string_t *detail = &code->val.internal_error.val;
    message = format_message("%s: %.*s", name, (int)detail->len, (const char *)detail->ptr);
  } else {
    message = format_message("%s", name);
  }
  wasi_http_types_error_code_free(code);
  return message;
}

// The parts of an absolute URL that wasi:http takes separately.
typedef struct {
  wasi_http_types_scheme_t scheme;
  task_string_t authority;
  task_string_t path_with_query;
  char *path_buffer;
} url_parts_t;

// Splits `scheme://authority/path?query#fragment`. The strings point into
// `url` except `path_buffer`, which the caller frees.
static bool split_url(const json_text_t *url, url_parts_t *parts) {
  const char *text = url->data;
  const char *separator = strstr(text, "://");
  if (separator == NULL || separator == text) return false;

  size_t scheme_len = (size_t)(separator - text);
  if (scheme_len == 4 && strncasecmp(text, "http", 4) == 0) {
    parts->scheme.tag = WASI_HTTP_TYPES_SCHEME_HTTP;
  } else if (scheme_len == 5 && strncasecmp(text, "https", 5) == 0) {
    parts->scheme.tag = WASI_HTTP_TYPES_SCHEME_HTTPS;
  } else {
    parts->scheme.tag = WASI_HTTP_TYPES_SCHEME_OTHER;
    parts->scheme.val.other = (task_string_t){(uint8_t *)text, scheme_len};
  }

  const char *authority = separator + 3;
  const char *authority_end = authority + strcspn(authority, "/?#");
  if (authority_end == authority) return false;
  parts->authority = (task_string_t){(uint8_t *)authority, (size_t)(authority_end - authority)};

  // The fragment stays with the client. The path defaults to "/".
  const char *path_end = authority_end + strcspn(authority_end, "#");
  size_t path_len = (size_t)(path_end - authority_end);
  bool needs_slash = path_len == 0 || *authority_end != '/';
  parts->path_buffer = malloc(path_len + 2);
  if (parts->path_buffer == NULL) abort();
  size_t offset = 0;
  if (needs_slash) parts->path_buffer[offset++] = '/';
  memcpy(parts->path_buffer + offset, authority_end, path_len);
  parts->path_with_query = (task_string_t){(uint8_t *)parts->path_buffer, offset + path_len};
  return true;
}

// Builds a GET request for `url`, or returns false with a message.
static bool build_request(const json_text_t *url, wasi_http_types_own_outgoing_request_t *request,
                          char **error) {
  url_parts_t parts = {0};
  if (memchr(url->data, '\0', url->len) != NULL || !split_url(url, &parts)) {
    *error = format_message("invalid URL %s: expected scheme://host/path", url->data);
    return false;
  }

  // The request takes ownership of the headers.
  *request = wasi_http_types_constructor_outgoing_request(wasi_http_types_constructor_fields());
  wasi_http_types_borrow_outgoing_request_t borrowed = wasi_http_types_borrow_outgoing_request(*request);
  wasi_http_types_method_t method = {.tag = WASI_HTTP_TYPES_METHOD_GET};

  const char *rejected = NULL;
  if (!wasi_http_types_method_outgoing_request_set_method(borrowed, &method)) {
    rejected = "method";
  } else if (!wasi_http_types_method_outgoing_request_set_scheme(borrowed, &parts.scheme)) {
    rejected = "scheme";
  } else if (!wasi_http_types_method_outgoing_request_set_authority(borrowed, &parts.authority)) {
    rejected = "authority";
  } else if (!wasi_http_types_method_outgoing_request_set_path_with_query(borrowed, &parts.path_with_query)) {
    rejected = "path";
  }
  free(parts.path_buffer);

  if (rejected != NULL) {
    wasi_http_types_outgoing_request_drop_own(*request);
    *error = format_message("invalid URL %s: the host rejected its %s", url->data, rejected);
    return false;
  }
  return true;
}

// Sends the GET and waits for the response head. Returns its status, or 0
// with a message.
static unsigned fetch_status(const json_text_t *url, char **error) {
  wasi_http_types_own_outgoing_request_t request;
  if (!build_request(url, &request, error)) return 0;

  // `handle` takes ownership of the request, whatever it returns.
  wasi_http_outgoing_handler_own_future_incoming_response_t future;
  wasi_http_outgoing_handler_error_code_t code;
  if (!wasi_http_outgoing_handler_handle(request, NULL, &future, &code)) {
    *error = describe_http_error(&code);
    return 0;
  }
  wasi_http_types_borrow_future_incoming_response_t borrowed_future =
      wasi_http_types_borrow_future_incoming_response(future);

  // The pollable is a child of the future, so it is dropped first.
  wasi_http_types_own_pollable_t pollable = wasi_http_types_method_future_incoming_response_subscribe(borrowed_future);
  wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(pollable));
  wasi_io_poll_pollable_drop_own(pollable);

  // After `block` the outer option is `some`. The first `get` takes the
  // response, so the outer result is `ok`.
  wasi_http_types_result_result_own_incoming_response_error_code_void_t outcome;
  bool ready = wasi_http_types_method_future_incoming_response_get(borrowed_future, &outcome);
  wasi_http_types_future_incoming_response_drop_own(future);

  if (!ready || outcome.is_err) {
    *error = format_message("the response was not available after waiting for it");
    return 0;
  }
  if (outcome.val.ok.is_err) {
    *error = describe_http_error(&outcome.val.ok.val.err);
    return 0;
  }

  // Dropping the response without consuming the body discards the body.
  wasi_http_types_own_incoming_response_t response = outcome.val.ok.val.ok;
  unsigned status = wasi_http_types_method_incoming_response_status(wasi_http_types_borrow_incoming_response(response));
  wasi_http_types_incoming_response_drop_own(response);
  return status;
}

static void append_http_status(json_buffer_t *out, const json_text_t *url) {
  char *error = NULL;
  unsigned status = fetch_status(url, &error);
  if (error != NULL) {
    append_error(out, error);
  } else {
    json_append_u64(out, status);
  }
}

// --- Shell -------------------------------------------------------------------

static void append_command_stdout(json_buffer_t *out, const json_text_t *command) {
  task_string_t command_string = {(uint8_t *)command->data, command->len};
  apex_task_shell_options_t options = {.cwd = {.is_some = false}, .stdin_ = {.is_some = false}};
  apex_task_shell_output_t output;
  apex_task_shell_error_t error;

  if (!apex_task_shell_run(&command_string, &options, &output, &error)) {
    static const char *const kinds[] = {"denied", "timed out", "failed"};
    const char *kind = error.tag < 3 ? kinds[error.tag] : "failed";
    // Every case of the variant carries a string in the same place.
    task_string_t *message = &error.val.denied;
    append_error(out, format_message("%s: %.*s", kind, (int)message->len, (const char *)message->ptr));
    apex_task_shell_error_free(&error);
    return;
  }

  // NOTE: wit-bindgen-c 0.57.1 generates no free function for `output`, and
  // the result's free function skips its ok case, so both lists are freed here.
  json_append_string(out, (const char *)output.stdout_.ptr, output.stdout_.len);
  task_list_u8_free(&output.stdout_);
  task_list_u8_free(&output.stderr_);
}

// --- Export ------------------------------------------------------------------

bool exports_task_run(task_string_t *input, task_string_t *ret, task_string_t *err) {
  tour_input_t tour;
  char *parse_error = tour_input_parse((const char *)input->ptr, input->len, &tour);
  task_string_free(input);
  if (parse_error != NULL) {
    // The generated post-return function frees `err` with free().
    char *message = format_message("%s; expected {\"file\": PATH, \"url\": URL, \"command\": CMD}, each key optional",
                                   parse_error);
    free(parse_error);
    *err = (task_string_t){(uint8_t *)message, strlen(message)};
    return false;
  }

  json_buffer_t out = {0};
  json_append(&out, "{\"language\": \"c\", \"file_bytes\": ");
  if (tour.file != NULL) {
    append_file_bytes(&out, tour.file);
  } else {
    json_append(&out, "null");
  }

  json_append(&out, ", \"http_status\": ");
  if (tour.url != NULL) {
    append_http_status(&out, tour.url);
  } else {
    json_append(&out, "null");
  }

  json_append(&out, ", \"command_stdout\": ");
  if (tour.command != NULL) {
    append_command_stdout(&out, tour.command);
  } else {
    json_append(&out, "null");
  }
  json_append(&out, "}");

  tour_input_free(&tour);
  *ret = (task_string_t){(uint8_t *)out.data, out.len};
  return true;
}
