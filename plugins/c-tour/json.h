// Just enough JSON for the tour: reading a flat input object and writing the
// output object.
#ifndef C_TOUR_JSON_H
#define C_TOUR_JSON_H

#include <stdbool.h>
#include <stddef.h>

// A decoded JSON string: UTF-8 bytes, NUL-terminated for convenience, but
// `len` counts the bytes, which may include `\u0000` escapes.
typedef struct {
  char *data;
  size_t len;
} json_text_t;

// The tour's input. A field is NULL when its key is absent or null.
typedef struct {
  json_text_t *file;
  json_text_t *url;
  json_text_t *command;
} tour_input_t;

// Parses `{"file": ..., "url": ..., "command": ...}` or `null`. Other keys are
// skipped. Returns NULL on success, else a malloc'd message for the caller to
// free. `text` must be valid UTF-8, as every WIT string is.
char *tour_input_parse(const char *text, size_t len, tour_input_t *input);

void tour_input_free(tour_input_t *input);

// A growable output buffer. Every append aborts when memory runs out, as
// the generated bindings do.
typedef struct {
  char *data;
  size_t len;
  size_t cap;
} json_buffer_t;

void json_append(json_buffer_t *out, const char *text);

// Appends `bytes` as a JSON string literal. Bytes that are not valid UTF-8
// become U+FFFD, one per maximal invalid subsequence (as Rust's
// `String::from_utf8_lossy` does), so the result is always valid UTF-8.
void json_append_string(json_buffer_t *out, const char *bytes, size_t len);

void json_append_u64(json_buffer_t *out, unsigned long long value);

#endif
